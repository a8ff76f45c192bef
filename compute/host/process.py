"""What every process of a joined host does first: take the machine's configuration from its environment
(agent.env, put there by `python -m compute.host run`) and reach the portal over the host API with the
host's own credential. No settings module, no database, no portal code."""

from __future__ import annotations

import logging

from compute.host import config, link


def configure_from_environment(*, require_portal: bool = True) -> config.LocalConfig:
    local = config.from_environment()
    if require_portal and not local.remote:
        raise SystemExit("a host needs BULKHEAD_PORTAL_URL and BULKHEAD_HOST_CREDENTIAL (from its join)")
    config.configure(local)
    if local.remote:
        link.register_links(link.http_links(local.portal_url, local.credential))
    return local


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
