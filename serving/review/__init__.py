"""Reviewer workspace in the browser, served by the scoring service at ``/review``.

Server-rendered HTML (Jinja2 templates, one vendored stylesheet, inline SVG charts, no JavaScript, no CDN):

- ``GET /review/login``: a form taking a reviewer (or admin) API key; the key stays server-side and the
  browser gets an HttpOnly, SameSite=Strict session cookie holding a random session id.
- ``GET /review/queue``: scored items of the reviewer's agency (admin: all agencies), filtered by domain,
  risk band, status (open/confirmed/cleared) and scoring date, newest or highest risk first, 25 a page.
- ``GET /review/items/{score_id}``: the input record, score, band, threshold, model, the explanation as a
  waterfall chart and a reason table; for transfers the accounts' recent counterparties and prior cases.
- ``POST /review/items/{score_id}/outcome``: confirmed/cleared + note (CSRF token), handed to the API's
  own ``POST /outcomes`` handler, so it becomes a case exactly like an API call.
- ``POST /review/logout``: ends the session.

Authorisation is the API's: the pages call the service's ``_authorize`` with the session's key (roles,
agency separation and rate limits apply unchanged) and show an item under the rule of ``GET /scores/{id}``.
"""

from types import SimpleNamespace

from serving.review.app import app as pages


class _RouteLabel:
    """Labels requests with the full route (``/review/items/{score_id}``) for the service's access log and metrics."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        base = scope.get("root_path", "").rstrip("/")  # the mount path, before routing extends it
        try:
            await self.inner(scope, receive, send)
        finally:
            if scope["type"] == "http":
                path = getattr(scope.get("route"), "path", None)
                if not path or not path.startswith("/"):
                    path = "/static" if scope.get("path", "").startswith(f"{base}/static/") else "/unmatched"
                scope["route"] = SimpleNamespace(path=base + path)


app = _RouteLabel(pages)

__all__ = ["app", "pages"]
