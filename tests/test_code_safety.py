"""Nothing in the bucket can make a worker run code: handler modules are imported only
when the user names them, and task documents and inputs are only ever parsed as JSON.

One `python -m buquet worker app:worker --drain` process runs over a local store seeded
with bait: modules beside the app whose import would leave a canary file (named like task
types, and like the modules task frameworks auto-discover), a task document that is a
pickle whose loading would leave a canary, and inputs that are Python, YAML and pickle
text. Afterwards no canary exists, the bait document is untouched, and the handler saw
each input as the plain JSON value it is.
"""

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import buquet

ROOT = Path(__file__).resolve().parent.parent

APP = textwrap.dedent("""
    import json, os
    import buquet

    worker = buquet.Worker(buquet.connect(), "safety-worker", drain=True, monitor=False, scheduler=False)

    @worker.task("echo")
    def echo(input):
        with open(os.environ["SEEN_FILE"], "a") as f:
            f.write(json.dumps(input) + "\\n")
        return input
""")

# Each bait module leaves a canary named after itself if it is ever imported.
BAIT_MODULES = ("evil", "tasks", "handlers", "celeryconfig", "echo", "buquet_tasks")


class _Canary:
    """Unpickling this opens (creates) the canary file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_worker_runs_no_code_from_the_bucket_and_imports_only_the_named_module(tmp_path):
    canaries = tmp_path / "canaries"
    canaries.mkdir()
    (tmp_path / "app.py").write_text(APP)
    for name in BAIT_MODULES:
        (tmp_path / (name + ".py")).write_text("open(%r, 'w').close()\n" % str(canaries / name))
    store_dir = tmp_path / "store"
    queue = buquet.Queue(buquet.LocalStore(str(store_dir)))

    inputs = [
        "__import__('os').system('touch %s')" % (canaries / "eval"),
        {"yaml": "!!python/object/apply:os.system ['touch %s']" % (canaries / "yaml")},
        {"pickle": pickle.dumps(_Canary(str(canaries / "pickle-input")), protocol=0).decode("latin-1")},
        ["evil", {"__class__": "evil.Thing", "__reduce__": ["os.system", "id"]}],
    ]
    echoed = [queue.submit("echo", value) for value in inputs]
    for name in ("evil", "tasks.run", "handlers:main"):  # task types that look like modules
        queue.submit(name, {"module": name})
    # A "task document" that is a pickle, with a ready entry pointing at it.
    bait_id = "0badc0de-0000-4000-8000-000000000000"
    bait_key = buquet.task_key("0", bait_id)
    bait_body = pickle.dumps(_Canary(str(canaries / "pickle-document")))
    queue.store.put(bait_key, bait_body)
    queue.store.put(buquet.ready_key("0", queue.now(), bait_id), b"")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "BUQUET_", "AWS_"))}
    env.update(PYTHONPATH=str(ROOT), BUQUET_LOCAL_DIR=str(store_dir), SEEN_FILE=str(tmp_path / "seen.jsonl"),
               XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    done = subprocess.run([sys.executable, "-m", "buquet", "worker", "app:worker", "--drain"], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(canaries)) == []
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert sorted(map(json.dumps, seen)) == sorted(map(json.dumps, inputs))
    assert [queue.get(t.id).status for t in echoed] == ["completed"] * len(inputs)
    assert queue.store.get(bait_key).body == bait_body  # skipped, not "repaired" or deleted
    assert "skipping unreadable task document %s" % bait_key in done.stderr
