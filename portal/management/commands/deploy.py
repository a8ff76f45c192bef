"""`manage.py deploy`: what a production container runs before it serves. Idempotent.

Applies migrations, collects static files (hashed names for whitenoise's manifest storage) and creates
the first operator from BULKHEAD_ADMIN_USERNAME / BULKHEAD_ADMIN_PASSWORD / BULKHEAD_ADMIN_EMAIL when no
account of that name exists yet. Compose runs it once before web, worker and beat start.
"""

from __future__ import annotations

import os
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from tenants import services
from tenants.actors import Actor


class Command(BaseCommand):
    help = "Migrate, collect static files and create the first operator (idempotent)."

    def handle(self, *args: Any, **options: Any) -> None:
        call_command("migrate", interactive=False, verbosity=0)
        self.stdout.write("migrations applied")
        username = os.environ.get("BULKHEAD_ADMIN_USERNAME", "admin")
        password = os.environ.get("BULKHEAD_ADMIN_PASSWORD", "")
        if not get_user_model().objects.filter(username=username).exists() and not password:
            raise CommandError(f"set BULKHEAD_ADMIN_PASSWORD to create the first operator {username!r}")
        call_command("collectstatic", interactive=False, verbosity=0)
        self.stdout.write("static files collected")
        _user, created = services.ensure_first_operator(
            actor=Actor.system("deploy"),
            username=username,
            password=password,
            email=os.environ.get("BULKHEAD_ADMIN_EMAIL", ""),
        )
        self.stdout.write(f"operator {username!r} " + ("created" if created else "already exists"))
