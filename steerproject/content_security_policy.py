"""The Content-Security-Policy header on every response (Django 5.2 has none built in).

Everything the panel, the admin and /api/docs load is served by this site: scripts and styles come only from
static files, never inline (htmx's own indicator <style> is off; see base.html and steerlab.css), so an
injected <script> or onclick= attribute does not run. 'self' in connect-src also covers the websocket to the
same host and port (CSP Level 3).
"""

from django.utils.deprecation import MiddlewareMixin

DIRECTIVES = (
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "font-src 'self'",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'self'",
    "form-action 'self'",
    "frame-ancestors 'none'",
)
POLICY = "; ".join(DIRECTIVES)


class ContentSecurityPolicyMiddleware(MiddlewareMixin):
    def process_response(self, request, response):
        response.headers.setdefault("Content-Security-Policy", POLICY)
        return response
