"""`python -m services.gateway`: runs the session gateway with settings from GENIE_GATEWAY_* variables.

The same as `genie serve gateway`, for environments without the genie CLI.
"""

from genie_models.allocator import keep_freed_memory
from services.gateway.server import serve
from services.logs import configure_logging
from services.settings import GatewaySettings

if __name__ == "__main__":
    keep_freed_memory()
    settings = GatewaySettings()
    configure_logging(settings.log_level)
    serve(settings)
