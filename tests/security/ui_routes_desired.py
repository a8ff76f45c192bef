"""UI matrix entries for the desired pages (merged into UI_ROUTES by test_ui_matrix.py)."""

from typing import Any

ROUTES: dict[str, Any] = {}
