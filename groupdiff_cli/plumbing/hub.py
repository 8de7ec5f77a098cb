"""Files on the Hugging Face Hub, named where a checkpoint path is expected.

The spelling is huggingface_hub's own file system's: ``hf://OWNER/REPO/PATH``, or
``hf://OWNER/REPO@REVISION/PATH`` for a branch, tag or commit, e.g.
``hf://Sichengmo/GroupDiff/gdiff-l-4-sit-xl-2-repa-resume.pth``. The file is fetched
into huggingface_hub's cache (``HF_HUB_CACHE``, by default ~/.cache/huggingface/hub)
by ``hf_hub_download``: a progress bar, an interrupted download resumed, the hub's own
check of what arrived (the sha256 of LFS files), ``HF_HUB_OFFLINE=1`` honoured; a file
in the cache is used without asking the hub again when offline.
"""

from __future__ import annotations

HUB_PREFIX = "hf://"


def is_hub_name(value) -> bool:
    return isinstance(value, str) and value.startswith(HUB_PREFIX)


def parse_hub_name(value: str, flag: str) -> tuple[str, str | None, str]:
    """``hf://OWNER/REPO[@REVISION]/PATH`` -> (repo id, revision or None, path in the repo)."""
    parts = value[len(HUB_PREFIX):].split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"{flag} {value}: a hub file is hf://OWNER/REPO/FILE (or hf://OWNER/REPO@REVISION/FILE)")
    repo, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{repo}", revision or None, "/".join(parts[2:])


def hub_file(value: str, flag: str) -> str:
    """The local path of the hub file ``value`` in huggingface_hub's cache, fetched when
    missing; a ValueError in one line naming the flag and the file otherwise."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    repo_id, revision, filename = parse_hub_name(value, flag)
    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise ValueError(f"{flag} {value}: not in the hub cache ({constants.HF_HUB_CACHE}) and {why}; fetch it "
                         f"where there is internet (`hf download {repo_id} {filename}`, or tools/offline_bundle.sh) "
                         f"and copy the cache here, or pass a local path") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{flag} {value}: no repository {repo_id} on the hub (a private one needs `hf auth "
                         f"login`)") from None
    except RevisionNotFoundError:
        raise ValueError(f"{flag} {value}: {repo_id} has no revision {revision}") from None
    except EntryNotFoundError:
        raise ValueError(f"{flag} {value}: {repo_id} has no file {filename}") from None
