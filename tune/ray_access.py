"""Who may talk to the search's Ray cluster: token authentication always on, a private cluster on loopback only.

Ray's control plane (GCS, raylets, the dashboard and its agents' job API) runs whatever a caller submits: with
authentication off, anyone who reaches a port can run code as the user. So:

- every cluster the project starts or joins runs with ``RAY_AUTH_MODE=token`` (a private local cluster makes its
  own token in ``~/.ray/auth_token``; a cluster's nodes share the head's token), and ``disabled`` is refused;
- a private local cluster (``--address local``) binds its services to 127.0.0.1, so nothing of it listens
  beyond this machine. Ray turns a loopback node address into the machine's network address unless its
  single-machine mode is on (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the mode it uses on macOS and Windows):
  that switch is set here, for this process and the Ray processes it starts.
"""

from __future__ import annotations

import os
AUTH_MODE = "RAY_AUTH_MODE"
SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
CLUSTER_RECIPE = ("on the head: `ray get-auth-token --generate` (it prints the token and keeps it in "
                  "~/.ray/auth_token), then `RAY_AUTH_MODE=token ray start --head ...`; on every other node and "
                  "where the search runs: `export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<the head's token>` (or copy "
                  "~/.ray/auth_token there) before `ray start --address HEAD:6379` or `python tune/search.py`")

# Ray's own error for a missing or wrong token names neither (a failed connection after its retries)
JOIN_HINT = f"A cluster with token authentication (as it should be) needs the head's token here: {CLUSTER_RECIPE}"


class AccessError(RuntimeError):
    """Ray would run without authentication, or cannot authenticate; the message says how to fix it."""


def require_token_auth(address: str) -> None:
    """Token authentication for every Ray connection of this process and the processes it starts. A private
    local cluster overrides a ``disabled`` in the environment (it is this process's own cluster); joining a
    cluster with ``disabled`` is refused, since the cluster's nodes must all use the head's token."""
    mode = os.environ.get(AUTH_MODE, "").strip().lower()
    if mode not in ("", "token") and address != "local":
        raise AccessError(f"{AUTH_MODE}={os.environ[AUTH_MODE]} in the environment: pdcbdm joins Ray clusters "
                          f"with token authentication only. Unset it and start the cluster with a token: "
                          f"{CLUSTER_RECIPE}")
    if mode not in ("", "token"):
        print(f"note: {AUTH_MODE}={os.environ[AUTH_MODE]} ignored: the search's private Ray cluster runs with "
              f"token authentication", flush=True)
    os.environ[AUTH_MODE] = "token"
    # Ray caches the mode when it is imported: refresh it, as Ray does when it turns the mode on itself
    # deferred: Ray, which --help and the checks of bad input never load
    from ray._raylet import Config

    Config.initialize("")


def bind_loopback() -> None:
    """Make a private local cluster started after this call bind its services to 127.0.0.1."""
    os.environ[SINGLE_MACHINE] = "0"
    # Ray reads the switch into a module constant when it is first imported; a process that imported it already
    # (a notebook, the test suite) sees the change through the constant, its child processes through the env
    # deferred: Ray, which --help and the checks of bad input never load
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False

