"""First-run set-up: the operator account, a demo tenant and this machine as host `local`. Idempotent."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field

from django.db import transaction

from tenants import services
from tenants.actors import Actor
from tenants.models import Tenant

ADMIN_USERNAME = "admin"


@dataclass
class BootstrapResult:
    message: str
    agent_queues: list[str] = field(default_factory=list)
    agent_host: str = ""
    agent_command: list[str] = field(default_factory=list)


def bootstrap() -> BootstrapResult:
    system = Actor.system("bootstrap")
    with transaction.atomic():
        given = os.environ.get("BULKHEAD_ADMIN_PASSWORD")
        password = given or secrets.token_urlsafe(12)
        admin, created = services.ensure_first_operator(
            actor=system, username=ADMIN_USERNAME, password=password, email="admin@localhost"
        )
        if not created:
            message = f"Operator login: {ADMIN_USERNAME} (password as set before)"
        elif given:
            message = f"Operator login: {ADMIN_USERNAME} / the password from BULKHEAD_ADMIN_PASSWORD"
        else:
            message = f"Operator login: {ADMIN_USERNAME} / password {password}  (shown once: write it down)"
        if not Tenant.objects.filter(name="demo").exists():
            services.create_tenant(
                actor=Actor(user=admin, label_override="bootstrap"),
                name="demo",
                display_name="Demo",
                owner=admin,
            )
    result = BootstrapResult(message=message)
    try:
        from compute.hosts import register_local_host
    except ImportError:
        return result
    host = register_local_host(actor=system)
    result.agent_queues = [host.queue]
    result.agent_host = str(host.pk)
    result.agent_command = ["manage.py", "agent", "--host", str(host.pk)]
    return result
