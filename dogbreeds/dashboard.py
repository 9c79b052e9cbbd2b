"""`dogbreeds dashboard RUN_DIR`: optuna-dashboard over every search's study under a run
directory, live while the searches run.

optuna-dashboard (github.com/optuna/optuna-dashboard) shows one Optuna storage; a pipeline
keeps two studies, one in each search's folder (study.py). `RunStudies` is that storage: a
read-only Optuna storage over every `study.journal` under RUN_DIR, found again each time the
dashboard lists its studies (a pipeline's head search appears when it starts). Each study is
named by its search's folder under RUN_DIR; its ids and its trials' ids (and the trial notes
filed under them) are renumbered so that they do not collide across files. The server answers GET and HEAD only: the dashboard's
buttons that would write (notes, deletions, tells) get 405.
"""

from __future__ import annotations

import copy
import os
import re
import threading

from dogbreeds import runs

# Trial ids of the n-th study are n * TRIAL_ID_STRIDE + the trial's id in its own file.
TRIAL_ID_STRIDE = 1_000_000_000


def run_studies(run_dir: str):
    """A read-only Optuna storage over every search's study under `run_dir`."""
    from optuna.storages import BaseStorage

    class RunStudies(BaseStorage):
        def __init__(self):
            self.run_dir = os.path.abspath(run_dir)
            self.studies = []  # (name, storage, its study id in the file), in order found
            self.lock = threading.Lock()

        def _scan(self):
            from dogbreeds import study

            with self.lock:
                known = {name for name, _, _ in self.studies}
                for folder, _, files in sorted(os.walk(self.run_dir)):
                    if runs.STUDY not in files:
                        continue
                    name = os.path.relpath(folder, self.run_dir)
                    name = os.path.basename(self.run_dir) if name == "." else name
                    if name in known:
                        continue
                    storage = study.storage(os.path.join(folder, runs.STUDY))
                    found = storage.get_all_studies()
                    if found:  # a journal before its study: seen on a later scan
                        self.studies.append((name, storage, found[0]._study_id))
            return self.studies

        def _study(self, study_id):
            if not 0 <= study_id < len(self.studies):
                raise KeyError(f"no study {study_id}")
            return self.studies[study_id]

        def _trial(self, trial_id):
            _, storage, _ = self._study(trial_id // TRIAL_ID_STRIDE)
            return storage, trial_id % TRIAL_ID_STRIDE

        @staticmethod
        def _renumber(trial, study_id):
            trial = copy.copy(trial)
            trial._trial_id = study_id * TRIAL_ID_STRIDE + trial._trial_id
            return trial

        # Reading.
        def get_all_studies(self):
            from optuna.study._frozen import FrozenStudy

            studies = []
            for study_id, (name, storage, own_id) in enumerate(self._scan()):
                frozen = next(s for s in storage.get_all_studies() if s._study_id == own_id)
                studies.append(FrozenStudy(name, None, directions=frozen.directions, user_attrs=frozen.user_attrs,
                                           system_attrs=self.get_study_system_attrs(study_id), study_id=study_id))
            return studies

        def get_study_id_from_name(self, study_name):
            for study_id, (name, _, _) in enumerate(self._scan()):
                if name == study_name:
                    return study_id
            raise KeyError(f"no study named {study_name}")

        def get_study_name_from_id(self, study_id):
            return self._study(study_id)[0]

        def get_study_directions(self, study_id):
            _, storage, own_id = self._study(study_id)
            return storage.get_study_directions(own_id)

        def get_study_user_attrs(self, study_id):
            _, storage, own_id = self._study(study_id)
            return storage.get_study_user_attrs(own_id)

        def get_study_system_attrs(self, study_id):
            _, storage, own_id = self._study(study_id)
            # optuna-dashboard keeps a trial's note under "dashboard:<trial id>:...".
            return {re.sub(r"^dashboard:(\d+):", lambda m: f"dashboard:{study_id * TRIAL_ID_STRIDE + int(m[1])}:", key): value
                    for key, value in storage.get_study_system_attrs(own_id).items()}

        def get_all_trials(self, study_id, deepcopy=True, states=None):
            _, storage, own_id = self._study(study_id)
            return [self._renumber(trial, study_id)
                    for trial in storage.get_all_trials(own_id, deepcopy=deepcopy, states=states)]

        def get_trial(self, trial_id):
            storage, own_id = self._trial(trial_id)
            return self._renumber(storage.get_trial(own_id), trial_id // TRIAL_ID_STRIDE)

        # Writing: never (the server refuses every request that would).
        def _read_only(self, *args, **kwargs):
            raise PermissionError("dogbreeds dashboard is read-only")

        create_new_study = delete_study = set_study_user_attr = set_study_system_attr = _read_only
        create_new_trial = set_trial_param = set_trial_state_values = _read_only
        set_trial_intermediate_value = set_trial_user_attr = set_trial_system_attr = _read_only

    return RunStudies()


def read_only(app):
    """A WSGI app that answers only GET and HEAD (405 otherwise)."""

    def guarded(environ, start_response):
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Content-Type", "text/plain"), ("Allow", "GET, HEAD")])
            return [b"dogbreeds dashboard is read-only\n"]
        # optuna-dashboard's static files fail (500) on a request that names no encoding.
        environ.setdefault("HTTP_ACCEPT_ENCODING", "identity")
        return app(environ, start_response)

    return guarded


def serve(run_dir: str, host: str = "127.0.0.1", port: int = 8080,
          allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")) -> None:
    """Serve optuna-dashboard over the studies under `run_dir` until SIGINT or SIGTERM: its WSGI
    server on a loopback port, behind the front of `dogbreeds serve` (`dogbreeds.front`: header
    time, connections, strict requests, `Host` in `allowed_hosts`) on host:port."""
    import asyncio
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    import optuna_dashboard

    from dogbreeds.config import ServeArgs
    from dogbreeds.front import Front, limits_from, serve_until_stopped

    if not os.path.isdir(run_dir):
        raise ValueError(f"run directory not found: {run_dir}")

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        timeout = 60  # seconds a connection's socket may wait: no thread is held for ever

        def log_message(self, *args):  # the dashboard polls every few seconds
            pass

    limits = limits_from(ServeArgs.model_construct(allowed_hosts=tuple(allowed_hosts)))
    app = read_only(optuna_dashboard.wsgi(run_studies(run_dir)))
    with make_server("127.0.0.1", 0, app, server_class=Server, handler_class=QuietHandler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        banner = f"dashboard: http://{host}:{port}/dashboard (the studies under {run_dir}; Ctrl-C stops)"
        asyncio.run(serve_until_stopped(Front(limits, server.server_port), host, port, banner))
