"""Starting the batching worker process and sizing what it holds, from the bot's process."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path

from bot.engine.batching.protocol import ParentEnd

# Tokens of KV cache the automatic size aims for: about 40 image conversations of LLaVA-1.5 (~700 tokens
# each) stay reusable next to four answers in progress.
_KV_TOKENS_TARGET = 32768
# Never take more than this share of the machine's memory for the KV cache by default.
_KV_MEMORY_SHARE = 0.25


def default_kv_cache_gb(model_dir: str | Path) -> int:
    """KV cache size (whole GB, as the scheduler takes it) for ``_KV_TOKENS_TARGET`` fp16 tokens, capped at a
    quarter of the machine's memory and at least 1 GB."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    text = config.get("text_config", config)
    layers = int(text.get("num_hidden_layers", 32))
    heads = int(text.get("num_attention_heads", 32))
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or int(text.get("hidden_size", 4096)) // heads)
    per_token = layers * kv_heads * head_dim * 2 * 2  # K and V, 2 bytes each
    wanted = math.ceil(_KV_TOKENS_TARGET * per_token / 2**30)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        cap = max(1, int(total * _KV_MEMORY_SHARE / 2**30))
    except (ValueError, OSError, AttributeError):
        cap = wanted
    return max(1, min(wanted, cap))


def signal_name(number: int) -> str:
    """``SIGKILL`` for 9: how a process was ended, for the log."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def start_worker() -> tuple[subprocess.Popen[bytes], ParentEnd]:
    """Start the child process, connected to this one by a socket pair.

    A plain interpreter rather than multiprocessing's "spawn", which re-imports the parent's ``__main__`` and so
    runs any script without a ``__name__`` guard a second time; forking a process that already runs OpenVINO
    threads is not safe either.
    """
    ours, theirs = socket.socketpair()
    env = dict(os.environ)
    # The child must find this package even when the parent found it through its own sys.path.
    root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    with theirs:
        process = subprocess.Popen(
            [sys.executable, "-c", "from bot.engine.batching.worker import main; main()", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
        )
    return process, ParentEnd(Connection(ours.detach()))
