"""The store port's contract (see "Stores" in buquet.py), run against every store:
MemoryStore, LocalStore on a temporary directory, and S3Store on moto and SeaweedFS.
The LocalStore's own promises (processes racing, crashes, odd keys, its layout) follow.
"""

import hashlib
import multiprocessing
import os
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

import buquet
import sigv4
from buquet import ConflictError, MemoryStore, StoreError, VersioningUnavailable
from buquet import LocalStore

KINDS = [
    "memory",
    "local",
    pytest.param("moto", marks=pytest.mark.moto),
    pytest.param("seaweedfs", marks=pytest.mark.seaweedfs),
]


def _s3_store(target):
    return buquet.S3Store(target.bucket, endpoint=target.endpoint, region=target.region,
                          credentials=sigv4.Credentials(target.access_key, target.secret_key))


def _make_store(kind, request, tmp_path, versioned=False):
    if kind == "memory":
        return MemoryStore(versioned=versioned)
    if kind == "local":
        return LocalStore(tmp_path / "store")
    # The bucket fixtures read @pytest.mark.versioned from the test.
    return _s3_store(request.getfixturevalue("moto_s3" if kind == "moto" else "seaweed_s3"))


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def store(kind, request, tmp_path):
    return _make_store(kind, request, tmp_path)


@pytest.fixture(params=["memory", "local"])
def embedded_store(request, tmp_path):
    return _make_store(request.param, request, tmp_path)


@pytest.fixture(params=["memory", pytest.param("moto", marks=pytest.mark.moto),
                        pytest.param("seaweedfs", marks=pytest.mark.seaweedfs)])
def versioned_store(request, tmp_path):
    return _make_store(request.param, request, tmp_path, versioned=True)


def md5_etag(body):
    return '"%s"' % hashlib.md5(body, usedforsecurity=False).hexdigest()


def put_all(store, keys):
    for key in keys:
        store.put(key, key.encode("utf-8"))


def in_parallel(function, items, threads=16):
    # fsync dominates a local write; concurrent fsyncs share the file system's commits.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(function, items))


def put_in_parallel(store, keys):
    in_parallel(lambda key: store.put(key, key.encode("utf-8")), keys)


def delete_in_parallel(store, keys):
    in_parallel(store.delete, keys)


def list_all(store, prefix="", page=1000):
    keys, after = [], None
    while True:
        found, truncated = store.list(prefix, start_after=after, limit=page)
        keys.extend(found)
        if not truncated:
            return keys
        after = found[-1]


# ==== get / put =============================================================


def test_getting_a_missing_key_returns_none(store):
    assert store.get("tasks/0/missing.json") is None


def test_a_put_object_reads_back_with_the_etag_the_put_returned(store):
    etag = store.put("tasks/0/a.json", b'{"x": 1}')

    blob = store.get("tasks/0/a.json")

    assert (blob.body, blob.etag) == (b'{"x": 1}', etag)
    assert etag == md5_etag(b'{"x": 1}')


def test_an_empty_body_round_trips(store):
    etag = store.put("ready/0/0000000001/a", b"")

    blob = store.get("ready/0/0000000001/a")

    assert (blob.body, blob.etag) == (b"", etag)


def test_the_etag_changes_with_the_content_and_only_with_it(store):
    first = store.put("k", b"one")
    second = store.put("k", b"two")
    third = store.put("k", b"one")

    assert first != second
    assert third == first
    assert store.get("k").body == b"one"


# ==== conditional writes ====================================================


def test_if_none_match_creates_a_missing_key(store):
    etag = store.put("k", b"new", if_none_match=True)

    assert store.get("k").etag == etag


def test_if_none_match_on_an_existing_key_conflicts_and_keeps_it(store):
    store.put("k", b"first")

    with pytest.raises(ConflictError):
        store.put("k", b"second", if_none_match=True)

    assert store.get("k").body == b"first"


def test_if_match_with_the_current_etag_replaces_the_object(store):
    etag = store.put("k", b"v1")

    new = store.put("k", b"v2", if_match=etag)

    assert store.get("k").body == b"v2"
    assert new == md5_etag(b"v2")


def test_if_match_with_a_stale_etag_conflicts_and_keeps_the_object(store):
    stale = store.put("k", b"v1")
    store.put("k", b"v2")

    with pytest.raises(ConflictError):
        store.put("k", b"v3", if_match=stale)

    assert store.get("k").body == b"v2"


def test_if_match_on_a_missing_key_conflicts_and_creates_nothing(store):
    with pytest.raises(ConflictError):
        store.put("tasks/0/gone.json", b"v", if_match=md5_etag(b"v"))

    assert store.get("tasks/0/gone.json") is None
    assert store.list("") == ([], False)


# ==== delete ================================================================


def test_delete_removes_the_key(store):
    store.put("k", b"v")

    store.delete("k")

    assert store.get("k") is None
    assert store.list("") == ([], False)


def test_deleting_a_missing_key_is_not_an_error(store):
    store.delete("never/was")

    assert store.get("never/was") is None


def test_a_deleted_key_can_be_created_again_with_if_none_match(store):
    store.put("k", b"v1")
    store.delete("k")

    store.put("k", b"v2", if_none_match=True)

    assert store.get("k").body == b"v2"


# ==== list ==================================================================

# In UTF-8 byte order: upper case before lower case, "-" < "." < "/" < "0", and a
# character beyond the BMP (4 bytes, F0...) after U+FF5E (EF BD 9E), although UTF-16
# code units would put it first.
ORDERED = ["A", "B", "a", "a-b", "a.b", "a/b", "a/b/c", "a0", "b", "é", "\uff5e", "\U0001f600"]
# The same without keys that extend a "directory" name with a byte below "/" ("a-b"
# beside "a/b"): SeaweedFS lists those in directory order (see the test below).
TREE = ["A", "a", "a/b", "a/b/c", "a0", "b", "c/d", "é", "\U0001f600"]


def test_keys_are_listed_in_utf8_byte_order(store, kind, request):
    if kind == "seaweedfs":
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "SeaweedFS lists a directory before the keys that extend its name with a byte "
            "below '/': a/b, a/b/c, a-b, a.b (and start_after='a/b' returns a-b)")))
    put_all(store, reversed(ORDERED))

    assert store.list("") == (ORDERED, False)
    assert store.list("", start_after="a/b") == (ORDERED[6:], False)


def test_a_prefix_selects_the_keys_that_start_with_it(store):
    put_all(store, TREE)

    assert store.list("a") == (["a", "a/b", "a/b/c", "a0"], False)
    assert store.list("a/") == (["a/b", "a/b/c"], False)
    assert store.list("a/b/") == (["a/b/c"], False)
    assert store.list("é") == (["é"], False)
    assert store.list("d") == ([], False)
    assert store.list("a/c/") == ([], False)


def test_start_after_lists_only_later_keys(store):
    put_all(store, TREE)

    assert store.list("", start_after="A") == (TREE[1:], False)
    assert store.list("", start_after="a/") == (TREE[2:], False)  # not itself a key
    assert store.list("", start_after="a/b/c") == (TREE[4:], False)
    assert store.list("a", start_after="a/b/") == (["a/b/c", "a0"], False)
    assert store.list("a/", start_after="A") == (["a/b", "a/b/c"], False)  # before the prefix
    assert store.list("a/", start_after="a0") == ([], False)  # after the prefix
    assert store.list("", start_after="\U0001f600") == ([], False)


def test_keys_under_a_name_that_is_also_a_key_or_a_start_after_are_not_skipped(store, kind, request):
    if kind == "seaweedfs":
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "SeaweedFS skips the whole 'directory' X/ when start_after is X (start_after='c' "
            "returns nothing at all), and says not truncated after a/b when a/b/c follows")))
    put_all(store, TREE)

    assert store.list("", start_after="a") == (TREE[2:], False)  # "a" is a key too
    assert store.list("", start_after="a/b") == (TREE[3:], False)
    assert store.list("", start_after="c") == (TREE[6:], False)  # "c" is no key
    assert store.list("a/", limit=1) == (["a/b"], True)


def test_limit_stops_the_listing_and_says_it_was_truncated(store):
    put_all(store, TREE)

    assert store.list("", limit=3) == (TREE[:3], True)
    assert store.list("", start_after="a/b/", limit=3) == (TREE[3:6], True)
    assert store.list("", limit=len(TREE)) == (TREE, False)
    assert store.list("a", limit=2) == (["a", "a/b"], True)


def test_paging_with_start_after_visits_every_key_once(store):
    keys = ["ready/%x/%010d/%s" % (shard, minute, name)
            for shard in (0, 3, 15) for minute in (28000000, 28000001) for name in ("t1", "t2")]
    put_all(store, keys)

    assert list_all(store, "ready/", page=5) == keys
    assert list_all(store, "ready/3/", page=1) == keys[4:8]


def test_listing_more_than_a_thousand_keys_pages_through_all_of_them(embedded_store):
    # Many keys on S3 cost a PUT each (seconds): the paging test above covers S3.
    keys = sorted("tasks/%x/%05d.json" % (i % 16, i) for i in range(1500))
    put_in_parallel(embedded_store, keys)

    first, truncated = embedded_store.list("tasks/")

    assert (first, truncated) == (keys[:1000], True)
    assert embedded_store.list("tasks/", start_after=first[-1]) == (keys[1000:], False)
    assert embedded_store.list("tasks/", limit=5000) == (keys, False)
    assert embedded_store.list("tasks/7/") == ([k for k in keys if k.startswith("tasks/7/")], False)


SPECIAL_KEYS = [
    "with space", "plus+sign", "percent%2Fliteral", "percent%", "tilde~", "star*",
    "question?", "hash#", "amp&", "equals=", "colon:", "semicolon;", "comma,", "at@",
    "dollar$", "quotes'\"", "brackets[]{}()", "caret^", "backtick`", "pipe|", "angle<>",
    "back\\slash", "ünïcödé/日本語", "emoji/\U0001f600", "dots/./x", "dots/../x", "dots/...",
    ".hidden", "-dash", "Mixed/Case", "a/", "a//b", "/leading",
]
# SeaweedFS stores "a//b" as "a/b" and "back\\slash" as "back/slash", drops the body of
# a key ending in "/", and answers 400 InvalidRequest to "." and ".." segments.
NOT_ON_SEAWEEDFS = {"a/", "a//b", "/leading", "back\\slash", "dots/./x", "dots/../x"}


def test_keys_with_special_characters_round_trip_and_list(store, kind):
    keys = [k for k in SPECIAL_KEYS if not (kind == "seaweedfs" and k in NOT_ON_SEAWEEDFS)]
    for key in keys:
        store.put(key, ("body of " + key).encode("utf-8"))

    bodies = {key: store.get(key).body.decode("utf-8") for key in keys}

    assert bodies == {key: "body of " + key for key in keys}
    assert store.list("") == (sorted(keys, key=lambda k: k.encode("utf-8")), False)


# ==== time ==================================================================


def test_now_is_an_aware_utc_datetime_close_to_the_local_clock(store):
    now = store.now()

    assert now.utcoffset() == timedelta(0)
    assert abs(now - datetime.now(timezone.utc)) < timedelta(seconds=5)


@pytest.mark.parametrize("make", [MemoryStore, LocalStore], ids=["memory", "local"])
def test_an_injected_clock_is_the_store_clock(make, tmp_path):
    fixed = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    store = make(clock=lambda: fixed) if make is MemoryStore else make(tmp_path, clock=lambda: fixed)

    assert store.now() == fixed


# ==== versions ==============================================================


@pytest.mark.versioned
def test_versions_are_listed_newest_first_with_the_delete_marker(versioned_store):
    store = versioned_store
    store.put("tasks/0/a.json", b"one")
    store.put("tasks/0/a.json", b"two")
    store.put("tasks/0/a.jsonx", b"a longer key with the same prefix")
    store.delete("tasks/0/a.json")

    versions = store.versions("tasks/0/a.json")

    assert [(v.is_delete_marker, v.is_latest) for v in versions] == [(True, True), (False, False), (False, False)]
    assert [v.etag for v in versions[1:]] == [md5_etag(b"two"), md5_etag(b"one")]
    assert [store.get_version("tasks/0/a.json", v.version_id).body for v in versions[1:]] == [b"two", b"one"]


@pytest.mark.versioned
def test_getting_the_version_of_a_delete_marker_returns_none(versioned_store):
    # moto answers 404 NoSuchVersion, AWS 405 MethodNotAllowed: both mean "no body".
    store = versioned_store
    store.put("k", b"one")
    store.delete("k")

    marker = store.versions("k")[0]

    assert marker.is_delete_marker
    assert store.get_version("k", marker.version_id) is None


def test_versions_on_an_unversioned_store_are_unavailable(store):
    store.put("tasks/0/a.json", b"one")
    store.put("tasks/0/a.json", b"two")

    with pytest.raises(VersioningUnavailable):
        store.versions("tasks/0/a.json")


def test_the_local_store_keeps_no_versions(tmp_path):
    store = LocalStore(tmp_path)
    store.put("k", b"v")

    with pytest.raises(VersioningUnavailable, match="^the local store keeps no object versions$"):
        store.versions("k")
    with pytest.raises(VersioningUnavailable, match="^the local store keeps no object versions$"):
        store.get_version("k", "some-version")


# ==== LocalStore: layout and odd keys =======================================


def files_under(root):
    found = []
    for directory, _, files in os.walk(root):
        found.extend(os.path.relpath(os.path.join(directory, f), root) for f in files)
    return sorted(found)


def test_an_object_is_a_file_named_after_its_key_holding_its_bytes(tmp_path):
    # The examples of LocalStore's docstring.
    store = LocalStore(tmp_path)
    store.put("tasks/3/3f2a.json", b'{"id": "3f2a"}')
    store.put("ready/3/0028691234/3f2a", b"")
    store.put("a", b"")
    store.put("a/b", b"")
    store.put("Tasks/x y", b"")
    store.put("a//b/", b"")
    store.put("../.x", b"")
    store.put("s" * 300, b"long")
    hashed = "+" + hashlib.sha256(b"s" * 300).hexdigest() + "@"

    assert files_under(tmp_path) == sorted([
        ".lock", "tasks/3/3f2a.json@", "ready/3/0028691234/3f2a@", "a@", "a/b@", "%54asks/x%20y@",
        "a/%/b/%@", "%2E./%2Ex@", hashed])
    assert (tmp_path / "tasks/3/3f2a.json@").read_bytes() == b'{"id": "3f2a"}'
    assert (tmp_path / hashed).read_bytes() == b"s" * 300 + b"\nlong"


ODD_KEYS = [
    "a", "a/b", "a/b/c", "a-b", "a0", "A", "a/", "a//b", "a///", "/", "//", "/x",
    ".", "..", "../x", "x/..", "x/./y", "...", ".lock", ".tmp-123-abc", ".segment",
    "@", "x@", "x@/y", "%", "%41", "%%", "+", "+abc", "CON", "nul.json", "x.", "x ",
    ":*?<>|\\\"", "\x01\x1f\x7f", "line\nbreak", "tab\tx", "é", "e\u0301", "日本/語",
    "\U0001f600", "\uffff",
    "s" * 300,  # longer than any file name may be
    "é" * 200,  # 400 bytes, 1,200 encoded characters
    "d" * 300 + "/child", "d" * 300 + "/" + "e" * 300 + "/leaf",
    ("d" * 300 + "/") * 3,  # hashed directories down to an empty last segment
    "p" * 128, "p" * 129,  # either side of the hashing threshold
]


def test_odd_keys_round_trip_list_in_order_and_leave_nothing_when_deleted(tmp_path):
    store = LocalStore(tmp_path)
    for key in ODD_KEYS:
        store.put(key, key.encode("utf-8") + b"!", if_none_match=True)

    assert {key: store.get(key).body for key in ODD_KEYS} == {k: k.encode("utf-8") + b"!" for k in ODD_KEYS}
    ordered = sorted(ODD_KEYS, key=lambda k: k.encode("utf-8"))
    assert store.list("") == (ordered, False)
    assert list_all(store, page=1) == ordered
    for prefix in ("a", "a/", "d", "d" * 300 + "/", "/", ".", "%", "é", "x@"):
        assert store.list(prefix) == ([k for k in ordered if k.startswith(prefix)], False), prefix

    for key in ODD_KEYS:
        store.delete(key)

    assert store.list("") == ([], False)
    assert os.listdir(tmp_path) == [".lock"]


def test_listing_agrees_with_the_memory_store_on_random_keys_and_queries(tmp_path):
    import random

    rand = random.Random(20240611)
    alphabet = ["a", "b", "A", "/", "/", "-", ".", "0", "%", "@", "+", "é", "\U0001f600"]

    def word(longest):
        return "".join(rand.choice(alphabet) for _ in range(rand.randint(1, longest)))

    keys = sorted({word(6) for _ in range(200)})
    local, memory = LocalStore(tmp_path), MemoryStore()
    put_in_parallel(local, keys)
    put_all(memory, keys)
    for round_ in range(2):
        for _ in range(200):
            prefix = rand.choice(["", word(3)])
            start_after = rand.choice([None, word(5), rand.choice(keys)])
            limit = rand.randint(1, 40)
            query = dict(start_after=start_after, limit=limit)
            assert local.list(prefix, **query) == memory.list(prefix, **query), (prefix, query)
        gone = rand.sample(keys, len(keys) // 2)  # then again with fewer keys
        keys = [key for key in keys if key not in gone]
        delete_in_parallel(local, gone)
        for key in gone:
            memory.delete(key)


def test_odd_keys_support_conditional_writes(tmp_path):
    store = LocalStore(tmp_path)
    for key in ("s" * 300, "d" * 300 + "/x", "a/", "..", "é" * 200):
        etag = store.put(key, b"v1")
        with pytest.raises(ConflictError):
            store.put(key, b"v2", if_none_match=True)
        with pytest.raises(ConflictError):
            store.put(key, b"v2", if_match=md5_etag(b"other"))
        assert store.put(key, b"v2", if_match=etag) == md5_etag(b"v2")
        assert store.get(key).body == b"v2"


def test_deleting_the_last_key_of_a_directory_removes_the_empty_directories(tmp_path):
    store = LocalStore(tmp_path)
    store.put("ready/3/0028691234/a", b"")
    store.put("ready/3/0028691235/b", b"")

    store.delete("ready/3/0028691234/a")

    assert files_under(tmp_path) == [".lock", "ready/3/0028691235/b@"]
    assert sorted(os.listdir(tmp_path / "ready/3")) == ["0028691235"]

    store.delete("ready/3/0028691235/b")

    assert os.listdir(tmp_path) == [".lock"]


def test_a_write_bound_to_lose_fails_before_writing_anything(tmp_path):
    store = LocalStore(tmp_path)

    with pytest.raises(ConflictError):
        store.put("leases/3/0028691234/a", b"", if_match=md5_etag(b""))

    assert [name for name in os.listdir(tmp_path) if name != ".lock"] == []


def test_a_write_that_loses_under_the_lock_leaves_no_files_behind(tmp_path):
    import fcntl

    store = LocalStore(tmp_path)
    etag = store.put("leases/3/0028691234/a", b"")
    waiting = threading.Event()
    real_flock = store._flock

    def flock(fd, operation):
        if operation == fcntl.LOCK_EX:
            waiting.set()
        real_flock(fd, operation)

    store._flock = flock
    errors = []

    def claim():
        try:
            store.put("leases/3/0028691234/a", b"mine", if_match=etag)
        except ConflictError as exc:
            errors.append(str(exc))

    with open(tmp_path / ".lock", "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        claimer = threading.Thread(target=claim)
        claimer.start()
        assert waiting.wait(10)  # its check passed and its temporary file is written
        os.unlink(tmp_path / "leases/3/0028691234/a@")  # another process deletes, under the lock
    claimer.join(10)

    assert errors == ['leases/3/0028691234/a does not exist (If-Match "%s")' % etag.strip('"')]
    assert os.listdir(tmp_path) == [".lock"]


def test_files_that_do_not_encode_a_key_are_not_listed(tmp_path):
    store = LocalStore(tmp_path)
    store.put("tasks/3/a.json", b"{}")
    (tmp_path / "tasks/3/notes.txt").write_text("a file copied in by hand")  # no "@"
    (tmp_path / "tasks/3/B.json@").write_text("not canonical: B is %42")
    (tmp_path / "tasks/3/%62.json@").write_text("not canonical: b is plain")
    (tmp_path / "tasks/3/%FF@").write_text("not UTF-8")
    (tmp_path / "tasks/3/+123@").write_text("a hashed name without its header")

    assert store.list("") == (["tasks/3/a.json"], False)


def test_a_leftover_temporary_file_is_ignored_and_swept_once_stale(tmp_path):
    store = LocalStore(tmp_path)
    store.put("tasks/3/a.json", b"{}")
    fresh = tmp_path / "tasks/3/.tmp-99999-000000000000"
    stale = tmp_path / "tasks/3/.tmp-99999-111111111111"
    fresh.write_bytes(b"half a wri")
    stale.write_bytes(b"half a wri")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))

    assert store.list("") == (["tasks/3/a.json"], False)
    assert store.get("tasks/3/a.json").body == b"{}"
    assert fresh.exists() and not stale.exists()


def test_reads_do_not_wait_for_the_write_lock(tmp_path):
    import fcntl

    store = LocalStore(tmp_path)
    store.put("k", b"v")
    results = []
    with open(tmp_path / ".lock", "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a writer that holds the lock and hangs
        reader = threading.Thread(target=lambda: results.append((store.get("k").body, store.list(""))))
        reader.start()
        reader.join(5)
        finished_under_the_lock = not reader.is_alive()

    assert finished_under_the_lock
    assert results == [(b"v", (["k"], False))]


def test_threads_sharing_one_store_lose_no_update(tmp_path):
    store = LocalStore(tmp_path)
    store.put("counter", b"0")
    threads = [threading.Thread(target=increment, args=(store, "counter", 25)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert store.get("counter").body == b"100"


def test_without_fcntl_the_local_store_says_what_to_use(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "fcntl", None)  # import fcntl now fails

    with pytest.raises(StoreError) as info:
        LocalStore(tmp_path)

    assert str(info.value) == ("the local store needs POSIX file locks (fcntl), which this platform lacks: "
                               "use an S3 bucket (S3_BUCKET), or WSL on Windows")


# ==== LocalStore: processes racing, crashes ==================================
# Children are spawned: forking a process that runs threads (pytest's servers, the
# thread pools) can deadlock the child, and Python 3.12+ warns about it.
START_METHOD = "spawn"


def increment(store, key, times):
    for _ in range(times):
        while True:
            blob = store.get(key)
            try:
                store.put(key, b"%d" % (int(blob.body) + 1), if_match=blob.etag)
                break
            except ConflictError:
                continue


def _increment_in_child(store, barrier, times):
    barrier.wait()
    increment(store, "counters/shared", times)


def _create_in_child(store, barrier, me, keys, results):
    won = []
    barrier.wait()
    for key in keys:
        try:
            store.put(key, me.encode(), if_none_match=True)
            won.append(key)
        except ConflictError:
            pass
    results.put((me, won))


def _write_forever(store, key, bodies, started):
    store.put(key, bodies[0])
    started.set()
    while True:
        for body in bodies:
            store.put(key, body)


def run_children(ctx, target, argsets, timeout=60):
    children = [ctx.Process(target=target, args=args) for args in argsets]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout)
    assert [child.exitcode for child in children] == [0] * len(children)


def test_eight_processes_incrementing_one_counter_lose_no_update(tmp_path):
    ctx = multiprocessing.get_context(START_METHOD)
    store = LocalStore(tmp_path)
    store.put("counters/shared", b"0")
    barrier = ctx.Barrier(8)

    run_children(ctx, _increment_in_child, [(store, barrier, 50)] * 8)

    assert store.get("counters/shared").body == b"400"


def test_eight_processes_racing_to_create_each_key_have_one_winner_per_key(tmp_path):
    ctx = multiprocessing.get_context(START_METHOD)
    keys = ["idempotency/scope/%02d.json" % i for i in range(40)]
    barrier = ctx.Barrier(8)
    results = ctx.Queue()

    store = LocalStore(tmp_path)
    children = [ctx.Process(target=_create_in_child, args=(store, barrier, "p%d" % i, keys, results))
                for i in range(8)]
    for child in children:
        child.start()
    won = dict(results.get(timeout=60) for _ in children)
    for child in children:
        child.join(10)

    winners = {key: [me for me, keys_won in won.items() if key in keys_won] for key in keys}
    assert all(len(names) == 1 for names in winners.values()), winners
    assert {key: store.get(key).body.decode() for key in keys} == {key: names[0] for key, names in winners.items()}


def test_a_writer_killed_mid_write_leaves_the_old_or_the_new_body_never_a_mix(tmp_path):
    ctx = multiprocessing.get_context(START_METHOD)
    # Large bodies, so that most instants of the writer's life are inside a write.
    bodies = [b"A" * (3 << 20), b"B" * (2 << 20), b"C" * (1 << 20)]
    store = LocalStore(tmp_path)
    writers = []
    for i, delay in enumerate((0.01, 0.05, 0.1, 0.2)):
        started = ctx.Event()
        child = ctx.Process(target=_write_forever, args=(store, "big/%d" % i, bodies, started))
        child.start()
        writers.append((child, started, delay))
    for child, started, delay in writers:
        assert started.wait(30)
        time.sleep(delay)
        child.kill()  # SIGKILL: no cleanup of any kind
        child.join(10)

    assert store.list("") == (["big/0", "big/1", "big/2", "big/3"], False)
    for i in range(4):
        assert store.get("big/%d" % i).body in bodies
        store.put("big/%d" % i, b"written after the crash", if_match=store.get("big/%d" % i).etag)


def test_delete_many_removes_every_key_given_and_tolerates_missing_ones(store):
    put_all(store, ["ready/0/1/a", "ready/0/1/b", "ready/1/2/c", "keep"])

    store.delete_many(["ready/0/1/a", "ready/0/1/b", "ready/1/2/c", "ready/9/9/never"])

    assert store.list("") == (["keep"], False)
