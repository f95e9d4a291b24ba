"""Errors the Hugging Face Hub raises, and the one line a user sees for each."""

from __future__ import annotations

from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


def hub_error_message(repo: str, error: Exception) -> str:
    """One line explaining why ``repo`` could not be fetched."""
    if isinstance(error, HFValidationError):
        return f"'{repo}' is neither a local directory nor a valid Hugging Face repo id"
    if isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError)):
        return (
            f"'{repo}' is not a local directory, and the Hugging Face Hub has no such repo "
            "(or it is private/gated: log in with `hf auth login`)"
        )
    if isinstance(error, HfHubHTTPError):
        return f"the Hugging Face Hub refused to serve '{repo}': {str(error).splitlines()[0]}"
    return (
        f"cannot reach the Hugging Face Hub to download '{repo}' and it is not in the local "
        "cache; check the network (and HF_HUB_OFFLINE) or pass a local model directory"
    )


HUB_ERRORS = (
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    HfHubHTTPError,
    ConnectionError,
    TimeoutError,
)
