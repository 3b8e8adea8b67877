"""The names `import smartmail` offers resolve, and keep resolving after their modules are imported."""

from __future__ import annotations

import pytest

import smartmail

PUBLIC = {
    "campaigns": [
        "create_campaign",
        "launch_campaign",
        "pause_campaign",
        "resume_campaign",
        "cancel_campaign",
        "campaign_status",
        "schedule_campaign",
    ],
    "contacts": ["create_contact", "upsert_contact", "get_contact", "delete_contact"],
    "imports": ["start_import", "job_status"],
    "segments": ["count", "save_segment"],
    "exports": ["export_contacts"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_module_functions_resolve_on_every_access(module):
    for _ in range(2):  # the second access comes after the module was imported
        namespace = getattr(smartmail, module)
        for name in PUBLIC[module]:
            assert callable(getattr(namespace, name)), f"smartmail.{module}.{name}"


def test_top_level_functions_resolve():
    for name in ("send", "send_many", "status", "track", "flush", "SendResult", "InvalidMessage"):
        assert getattr(smartmail, name) is not None
