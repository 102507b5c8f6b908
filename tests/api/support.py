"""Assertions shared by the API tests."""


def assert_error(response, status: int, field: str | None = None) -> dict:
    """The one error shape: exactly {detail, field}, with a readable detail."""
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"detail", "field"}
    assert isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in body["detail"]
    assert body["field"] == field
    return body
