"""The Hugging Face hub as sdprep sees it: offline mode, hub ids versus local paths, reachability.

Models are given as a local folder or a hub repo id (`owner/name`). Something that looks like a
path (`/x`, `./x`, `~/x`, `a/b/c`, `C:\\x`) is never sent to the hub, and a download is not
attempted when the hub's host cannot be reached: huggingface_hub would retry five times (~23 s)
before failing with the same answer.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT = 3.0  # seconds to open a TCP connection to the hub before calling it unreachable


def hub_offline() -> bool:
    """True when the hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def is_path_like(spec: str) -> bool:
    """True when `spec` is written as a path: `/x`, `./x`, `../x`, `~/x`, `a/b/c`, `C:\\x`."""
    spec = spec.strip()
    return spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1 or spec[1:2] == ":"


def is_hub_id(spec: str) -> bool:
    """True when `spec` reads as a hub repo id (`owner/name`) and names no existing local path."""
    spec = spec.strip()
    if Path(spec).expanduser().exists():
        return False
    return bool(HUB_ID.match(spec)) and not is_path_like(spec)


def hub_reachable(timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to the hub's host (HF_ENDPOINT, else huggingface.co) opens in time."""
    url = urlsplit(os.environ.get("HF_ENDPOINT", "").strip() or DEFAULT_ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False
