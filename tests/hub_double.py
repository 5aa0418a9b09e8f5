"""Test helpers for the push and app tests: a loopback double of the Hugging Face Hub's HTTP API, and a tiny adapter.

`HubDouble` serves, on 127.0.0.1 and a random port, just the endpoints huggingface_hub 2.4 calls to create a repo,
upload a folder (preupload answers "regular", so files come inline in the commit and nothing goes through xet or
LFS), read repo info and the file tree, and resolve (HEAD/GET) files. It checks the Authorization header like the
Hub: no token -> 401 for writes and private repos, a wrong token -> 401 "Invalid credentials". Point the real client
at it with HF_ENDPOINT, set before huggingface_hub is imported (in a subprocess).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

# A fresh random token per test session: nothing token-shaped is committed, and the leak tests grep for this value.
USER, TOKEN = "dpo-tester", "hf_" + secrets.token_hex(17)
REPO_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/(preupload|commit|revision|tree)/([^/]+)(/.*)?)?$")
RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1] if self.commits else "0" * 40


class HubDouble:
    """The Hub API double; `repos` holds what was pushed, `log` every (method, path) it served."""

    def __init__(self, users: dict[str, str] | None = None):
        self.tokens = {token: user for user, token in (users or {USER: TOKEN}).items()}
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "HubDouble":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(hub: HubDouble):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every reply sets Content-Length

        def log_message(self, *args):  # quiet: the tests read hub.log instead
            pass

        # ------------------------------------------------------------ plumbing
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while (size := int(self.rfile.readline().strip(), 16)) > 0:
                    data += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return data
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None):
            data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
            self.send_response(status)
            headers = {"Content-Type": "application/json", **(headers or {}), "Content-Length": str(len(data))}
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int, message: str, code: str | None = None):
            headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
            self._send(status, {"error": message}, headers)

        def _user(self) -> str | None | bool:
            """The caller: a user name, None when anonymous, False for a token the Hub does not know."""
            auth = self.headers.get("Authorization", "")
            if not auth:
                return None
            return hub.tokens.get(auth.removeprefix("Bearer ").strip(), False)

        def _repo(self, repo_id: str, user, write: bool = False) -> Repo | None:
            """The repo if `user` may see (or write) it; otherwise sends the Hub's 401/404 and returns None."""
            repo = hub.repos.get(repo_id)
            if user is False:
                self._error(401, "Invalid credentials in Authorization header")
            elif repo is None or (repo.private and user != repo_id.split("/")[0]):
                self._error(401 if user is None else 404, "Repository not found", "RepoNotFound")
            elif write and user != repo_id.split("/")[0]:
                self._error(403, "You don't have the rights to write to this repo")
            else:
                return repo
            return None

        # ------------------------------------------------------------ routes
        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            path = unquote(urlsplit(self.path).path)
            hub.log.append((self.command, path))
            user = self._user()
            if path == "/":
                return self._send(200, {"hub": "loopback double"})
            if path == "/api/whoami-v2":
                if not user:
                    return self._error(401, "Invalid credentials in Authorization header")
                return self._send(200, {"type": "user", "name": user, "orgs": [], "auth": {"type": "access_token"}})
            if m := RESOLVE.match(path):
                repo_id, revision, filename = m.groups()
                if (repo := self._repo(repo_id, user)) is None:
                    return None
                if revision not in ("main", repo.sha):
                    return self._error(404, "Invalid rev id", "RevisionNotFound")
                if filename not in repo.files:
                    return self._error(404, "Entry not found", "EntryNotFound")
                content = repo.files[filename]
                etag = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
                return self._send(200, content, {"Content-Type": "application/octet-stream", "ETag": f'"{etag}"',
                                                 "X-Repo-Commit": repo.sha})
            if (m := REPO_API.match(path)) and m.group(2) in (None, "revision", "tree"):
                repo_id, kind, _, sub = m.groups()
                if (repo := self._repo(repo_id, user)) is None:
                    return None
                if kind == "tree":
                    prefix = (sub or "/").lstrip("/")
                    return self._send(200, [
                        {"type": "file", "path": p, "size": len(c),
                         "oid": hashlib.sha1(b"blob %d\0" % len(c) + c).hexdigest()}
                        for p, c in sorted(repo.files.items()) if p.startswith(prefix)])
                return self._send(200, {"id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                                        "sha": repo.sha, "private": repo.private, "tags": [],
                                        "siblings": [{"rfilename": p} for p in sorted(repo.files)]})
            return self._error(404, f"double: no route for GET {path}")

        def do_POST(self):
            path = unquote(urlsplit(self.path).path)
            hub.log.append(("POST", path))
            body, user = self._body(), self._user()
            if not user:  # every POST here writes
                return self._error(401, "Invalid credentials in Authorization header" if user is False else
                                   "You must be authenticated to do this")
            if path == "/api/validate-yaml":
                return self._send(200, {"errors": [], "warnings": []})
            if path == "/api/repos/create":
                payload = json.loads(body)
                repo_id = f"{payload.get('organization') or user}/{payload['name']}"
                if repo_id.split("/")[0] != user:
                    return self._error(403, "You don't have the rights to create a repo in this namespace")
                if repo_id in hub.repos:
                    return self._error(409, "You already created this model repo")
                private = payload.get("visibility") == "private" or bool(payload.get("private"))
                hub.repos[repo_id] = Repo(private=private)
                return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
            if (m := REPO_API.match(path)) and m.group(2) in ("preupload", "commit"):
                repo_id, kind = m.group(1), m.group(2)
                if (repo := self._repo(repo_id, user, write=True)) is None:
                    return None
                if kind == "preupload":  # "regular": contents come inline with the commit, no LFS/xet transfer
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                return self._commit(repo_id, repo, body)
            return self._error(404, f"double: no route for POST {path}")

        def _commit(self, repo_id: str, repo: Repo, body: bytes):
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    repo.files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    repo.files.pop(value["path"], None)
                elif item["key"] != "header":
                    return self._error(400, f"double: unsupported commit operation {item['key']!r}")
            oid = hashlib.sha1(body + repo.sha.encode()).hexdigest()
            repo.commits.append(oid)
            return self._send(200, {"success": True, "commitOid": oid, "commitUrl": f"{hub.url}/{repo_id}/commit/{oid}",
                                    "pullRequestUrl": None})

    return Handler


# ---------------------------------------------------------------- a tiny adapter folder, as pipeline.run leaves one


def make_tiny_adapter(folder: str | Path, *, load_in_4bit: bool = False, base: str = "offline:gpt2-tiny",
                      other_shape: dict | None = None, seed: int = 0) -> Path:
    """A LoRA adapter on the tiny offline GPT-2 with random (non-zero) lora_B, plus tokenizer and run files.

    No training: the weights only need to be non-trivial and comparable. `other_shape` builds the adapter on a GPT-2
    of another size while still naming `base`, i.e. an adapter that does not fit the base it claims.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from dpo_pipeline import model as model_lib
    from offline_models.gpt2 import gpt2_tokenizer
    from dpo_pipeline.args import parse
    from dpo_pipeline.runs import write_json_atomic

    folder = Path(folder)
    torch.manual_seed(seed)
    if other_shape:
        model = GPT2LMHeadModel(GPT2Config(**other_shape, vocab_size=50257))
    else:
        model = model_lib.load_base_model(base, load_in_4bit=load_in_4bit)
    peft_model = model_lib.add_lora(model, model_lib.lora_config(model, r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # lora_B starts at zero (a no-op adapter); make it change the outputs
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    peft_model.peft_config["default"].base_model_name_or_path = base  # as pipeline.run names it
    peft_model.save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    config = parse(dict(model_name_or_path=base, load_in_4bit=load_in_4bit, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                        max_steps=2, max_length=48, per_device_train_batch_size=4, output_dir=str(folder)))
    write_json_atomic(folder / "run_config.json", config.to_dict())
    write_json_atomic(folder / "record.json", {
        "config": config.to_dict(), "status": "finished", "train_pairs": 320, "eval_pairs": 80, "train_steps": 2,
        "final_train_loss": 0.69, "best_eval": {"step": 2, "loss": 0.68},
        "final_eval": {"loss": 0.68, "rewards/accuracies": 0.55, "rewards/margins": 0.01},
        "log_history": [{"step": 2, "loss": 0.69}], "wall_time_s": 1.0, "pairs_per_second": 8.0,
        "adapter_path": str(folder), "model_info": {}, "error": None,
        "note": "test adapter: random LoRA weights, placeholder metrics",  # an extra key a reader must tolerate
    })
    return folder
