"""Leave request bodies to Django under daphne.

twisted's Request parses every POST multipart/form-data body itself (into request.args, which daphne never
reads) before daphne hands the request over, and answers a malformed one, such as a multipart body without
a boundary, with a bare 400 and a closed connection: Django, and the API's error shape, never see it.
twisted lets a request skip that parsing (parsePOSTFormSubmission=False); daphne does not pass it.
"""

from functools import wraps

from daphne.http_protocol import WebRequest


def leave_form_parsing_to_django() -> None:
    if getattr(WebRequest.__init__, "leaves_forms_to_django", False):
        return
    original = WebRequest.__init__

    @wraps(original)
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("parsePOSTFormSubmission", False)
        original(self, *args, **kwargs)

    __init__.leaves_forms_to_django = True
    WebRequest.__init__ = __init__
