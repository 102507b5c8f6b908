"""The API tokens page: a user makes bearer tokens for scripts, sees each raw token once, and revokes them.

Only a token's SHA-256 is stored (ApiToken.issue), so the page that creates one is the only place it is shown.
"""

from django import forms
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_http_methods, require_POST

from steering_app.models import ApiToken

TEMPLATE = "steering/api_tokens.html"


class TokenForm(forms.ModelForm):
    class Meta:
        model = ApiToken
        fields = ["name"]


@login_required
@require_http_methods(["GET", "POST"])
def api_tokens(request):
    """GET lists the user's tokens; POST issues one and shows it in the response, once."""
    form = TokenForm(request.POST or None)
    created = raw = None
    if request.method == "POST" and form.is_valid():
        created, raw = ApiToken.issue(request.user, form.cleaned_data["name"])
        form = TokenForm()
    tokens = ApiToken.objects.filter(user=request.user, revoked_at__isnull=True)
    context = {"form": form, "tokens": tokens, "created": created, "raw_token": raw}
    return render(request, TEMPLATE, context, status=400 if form.errors else 200)


@login_required
@require_POST
def revoke_api_token(request, pk):
    # Another user's token is a 404, as if it did not exist: its id tells nothing.
    token = get_object_or_404(ApiToken, pk=pk, user=request.user, revoked_at__isnull=True)
    token.revoked_at = timezone.now()
    token.save(update_fields=["revoked_at"])
    return redirect("api-tokens")
