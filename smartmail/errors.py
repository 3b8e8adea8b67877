"""Domain exceptions, in one place: each bad-input error names the field it is about."""

from __future__ import annotations


class FieldError(ValueError):
    """Bad input: `field` names what was wrong (`messages[3].to`, `rules.all[2].op`), `reason` says why."""

    def __init__(self, reason: str, *, field: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class AddressError(FieldError):
    """An email address or mailbox that cannot be used."""


class InvalidMessage(FieldError):
    """Bad input to send() or send_many()."""


class InvalidInput(FieldError):
    """Bad input to the contacts, lists, imports, segments or campaigns API."""


class InvalidSegment(InvalidInput):
    """A segment rule that cannot be compiled; `field` is its path, as in `rules.all[2].op`."""


class NotFound(LookupError):
    """No contact, list, segment or campaign by that name."""


class TemplateNotFound(LookupError):
    """No database row and no directory carries this template name."""


class TemplateError(ValueError):
    """A template could not be compiled or rendered; the message names the template and line."""

    def __init__(self, message: str, *, template: str, line: int | None = None) -> None:
        where = f"template {template}" + (f", line {line}" if line else "")
        super().__init__(f"{where}: {message}")
        self.field = "template"
        self.template = template
        self.line = line


class InvalidToken(ValueError):
    """A signed token that is malformed, truncated, altered or not signed by this installation."""


class SettingsError(RuntimeError):
    """A setting is missing or malformed; the message names the environment variable."""


class PolicyError(ValueError):
    """The traffic-shaping policy file is unreadable or malformed; the message names the file and the key."""


class Unauthenticated(PermissionError):
    """No usable API key: missing, malformed, unknown, revoked or expired (`reason` says which)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Conflict(RuntimeError):
    """The request clashes with the current state (a name taken, a campaign not in a state that allows it)."""


class ConflictingInput(Conflict, InvalidInput):
    """A value the stored state does not allow (a name taken, a campaign's state): a 409 over HTTP,
    and still the InvalidInput naming `field` that the CLI and Python callers catch."""

    def __init__(self, reason: str, *, field: str) -> None:
        InvalidInput.__init__(self, reason, field=field)
