"""The prop-stream HTTP API: the trading terminal's runtime endpoints.

``api`` sits above ``prop_stream`` (imports flow ``api -> prop_stream``). Build the
app with :func:`api.main.create_app`; ``docs/api.md`` describes every endpoint.
"""

from api.main import create_app

__all__ = ["create_app"]
