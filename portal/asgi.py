"""ASGI entry point: HTTP through Django, websockets through Channels (session auth, Origin checked)."""

import gc
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

from portal.asgi_threads import get_pooled_asgi_application

# Requests on reused threads: each finds its database and Redis connections open (asgi_threads).
django_asgi_app = get_pooled_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from compute.routing import websocket_urlpatterns as compute_websockets  # noqa: E402
from imaging.distribution.app import RegistryApp  # noqa: E402
from portal.daphne_tuning import tune_daphne  # noqa: E402
from portal.routing import websocket_urlpatterns as portal_websockets  # noqa: E402

tune_daphne()

from compute.network_services import resolve_service_names_ahead  # noqa: E402

resolve_service_names_ahead()  # the hosts' first network requests find the portal's names answered

application = ProtocolTypeRouter(
    {
        # /v2/: the built-in registry (streams bodies); everything else: Django.
        "http": RegistryApp(django_asgi_app),
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter([*portal_websockets, *compute_websockets]))
        ),
    }
)

# Everything loaded so far (Django, the apps, their modules) lives as long as the process: keep it out
# of the cyclic collector's scans, which otherwise cost tens of milliseconds on large requests.
gc.freeze()
