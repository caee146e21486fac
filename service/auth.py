"""The optional API key: a bearer token required on every ``/v1`` route when the service has one."""

import secrets
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.limits import ServiceError


def api_key_dependencies(api_key: str | None) -> list:
    """The router dependencies that check ``Authorization: Bearer <api_key>`` (none without a key)."""
    if api_key is None:
        return []
    bearer = HTTPBearer(auto_error=False, description="the service's API key (serve.py --api-key)")
    expected = api_key.encode()

    async def check_api_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), expected):
            raise ServiceError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                               headers={"WWW-Authenticate": "Bearer"})

    return [Depends(check_api_key)]
