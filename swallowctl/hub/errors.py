"""Every Hub, network and disk failure of a download as one actionable SwallowError line."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from swallowctl.core import models
from swallowctl.core.errors import RuntimeFailure, SwallowError, UsageError

_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{6,}")


@contextmanager
def hub_errors(repo_id: str, revision: str, endpoint: str) -> Iterator[None]:
    """Turn every Hub, network and disk failure into one actionable SwallowError line."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import errors as hf

    at = f"'{repo_id}' (revision {revision})"
    again = "run the same command again: finished files and partial files are kept"
    try:
        yield
    except SwallowError:
        raise
    except hf.GatedRepoError as e:
        login = "then `hf auth login` or set HF_TOKEN, and " + again
        if _status(e) == 403:
            login = "the token in use has no access yet: accept with that account, or " + login
        raise RuntimeFailure(
            f"model {at} is gated: accept its licence at {endpoint}/{repo_id}", hint=login
        ) from None
    except hf.RepositoryNotFoundError:
        matches = models.close_matches(repo_id)
        maybe = f"did you mean {' or '.join(map(repr, matches))}? " if matches else ""
        raise UsageError(
            f"model '{repo_id}' was not found on the Hub ({endpoint})",
            hint=maybe + "check the spelling (org/name); a private repo needs `hf auth login`",
        ) from None
    except hf.RevisionNotFoundError:
        raise UsageError(
            f"model '{repo_id}' has no revision '{revision}'",
            hint="use a branch, tag or full commit id that exists (default: main)",
        ) from None
    except hf.RemoteEntryNotFoundError as e:
        raise RuntimeFailure(f"a file of {at} vanished from the Hub: {one_line(e)}") from None
    except hf.OfflineModeIsEnabled:
        raise RuntimeFailure(
            f"offline (HF_HUB_OFFLINE): cannot fetch {at}", hint="unset HF_HUB_OFFLINE"
        ) from None
    except hf.HfHubHTTPError as e:
        status = _status(e)
        if status in (401, 403):
            raise RuntimeFailure(
                f"the Hub refused access to {at} (HTTP {status})",
                hint=f"log in with `hf auth login` or set HF_TOKEN, then {again}",
            ) from None
        raise RuntimeFailure(
            f"the Hub failed while serving {at} (HTTP {status})",
            hint=f"wait a little, then {again}",
        ) from None
    except (httpx2.TransportError, hf.LocalEntryNotFoundError) as e:
        raise RuntimeFailure(
            f"network error talking to {endpoint} about {at}: {one_line(e)}",
            hint=f"check the connection or HF_ENDPOINT, then {again}",
        ) from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise RuntimeFailure(
                f"no space left on the disk while fetching {at} ({e.filename or 'cache'})",
                hint=f"free some space or set HF_HUB_CACHE / --local-dir elsewhere, then {again}",
            ) from None
        raise RuntimeFailure(f"cannot write {at} to disk: {one_line(e)}") from None


def _status(e: Any) -> int | None:
    response = getattr(e, "response", None)
    return response.status_code if response is not None else None


def one_line(error: BaseException) -> str:
    """First line of an error, shortened, with anything token-shaped masked."""
    text = (str(error).strip() or type(error).__name__).splitlines()[0]
    token = os.environ.get("HF_TOKEN")
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)[:200]
