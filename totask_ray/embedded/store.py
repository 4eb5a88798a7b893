"""SQLite storage of the embedded platform: schema, creation helpers and the queries the app runs.

One `Store` holds one connection. The server process uses one from its event loop; tests and seeders
open their own `Store` on the same file from another process (WAL mode lets them read while the
server writes). Every query is short; bulk creation uses `executemany` inside one transaction.

Timestamps are stored as fixed-width UTC strings (`2025-01-03T10:20:30.123456Z`) so that string
comparison is time order.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

_ID_CACHE_SIZE = 16
_ALL = 2**62  # "no limit" for a page read
TASK_FIELDS = ("id", "project", "data_unit", "status", "assignee", "created_at", "updated_at", "data")
JOB_STATUSES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED")
SERVE_STATUSES = (
    "NOT_STARTED",
    "DEPLOYING",
    "DEPLOY_FAILED",
    "RUNNING",
    "UNHEALTHY",
    "DELETING",
    "UNAVAILABLE",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS projects (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    data_collection_id INTEGER NULL,
    classes TEXT NULL
);
CREATE TABLE IF NOT EXISTS data_collections (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS file_specifications (
    id INTEGER PRIMARY KEY,
    data_collection_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    is_primary INTEGER NOT NULL DEFAULT 0,
    is_required INTEGER NOT NULL DEFAULT 0,
    file_type TEXT NOT NULL DEFAULT 'image'
);
CREATE INDEX IF NOT EXISTS file_specifications_dc ON file_specifications (data_collection_id);
CREATE TABLE IF NOT EXISTS data_units (
    id INTEGER PRIMARY KEY,
    data_collection_id INTEGER NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS data_units_dc ON data_units (data_collection_id);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    data_unit_id INTEGER NOT NULL,
    specification_name TEXT NOT NULL,
    path TEXT NULL,
    url TEXT NULL,
    file_name_original TEXT NULL,
    is_primary INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS files_data_unit ON files (data_unit_id);
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL,
    data_unit_id INTEGER NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    assignee INTEGER NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    data TEXT NOT NULL DEFAULT '{}'
);
-- (project_id, id, ...) covers every filter column, so any filter set can be answered in id order
-- from the index alone. The others serve selective equality and range filters.
CREATE INDEX IF NOT EXISTS tasks_project ON tasks (project_id, id, status, assignee, created_at, data_unit_id);
CREATE INDEX IF NOT EXISTS tasks_project_status ON tasks (project_id, status);
CREATE INDEX IF NOT EXISTS tasks_project_assignee ON tasks (project_id, assignee);
CREATE INDEX IF NOT EXISTS tasks_project_created ON tasks (project_id, created_at);
CREATE TABLE IF NOT EXISTS annotation_history (
    id INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL,
    action TEXT NOT NULL,
    schema TEXT NULL,
    data TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS annotation_history_task ON annotation_history (task_id, id);
CREATE TABLE IF NOT EXISTS plugin_releases (
    id INTEGER PRIMARY KEY,
    code TEXT NOT NULL,
    version TEXT NOT NULL,
    config TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS plugin_releases_code ON plugin_releases (code, id);
CREATE TABLE IF NOT EXISTS agents (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    url TEXT NULL,
    status TEXT NOT NULL DEFAULT 'connected',
    token TEXT NULL
);
CREATE TABLE IF NOT EXISTS serve_applications (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    plugin_release_id INTEGER NULL,
    plugin_code TEXT NULL,
    version TEXT NULL,
    status TEXT NOT NULL DEFAULT 'NOT_STARTED',
    agent_id INTEGER NULL,
    job_id INTEGER NULL,
    route_prefix TEXT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS serve_applications_code ON serve_applications (plugin_code, id);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    action TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'PENDING',
    params TEXT NOT NULL DEFAULT '{}',
    progress_record TEXT NULL,
    metrics_record TEXT NULL,
    result TEXT NULL,
    agent_id INTEGER NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS logs (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NULL,
    event TEXT NOT NULL,
    data TEXT NULL,
    datetime TEXT NOT NULL,
    step TEXT NULL,
    level TEXT NULL
);
CREATE INDEX IF NOT EXISTS logs_job ON logs (job_id, id);
"""


_CANONICAL_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def utc_now() -> str:
    """Now, as the store writes timestamps: fixed-width UTC with microseconds."""
    return format_ts(datetime.now(UTC))


def format_ts(value: datetime | date | str) -> str:
    """A datetime, date or ISO-8601 string as the store's fixed-width UTC string."""
    if isinstance(value, str):
        if _CANONICAL_TS.fullmatch(value):
            return value
        value = parse_ts(value)
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.isoformat(timespec="microseconds") + "Z"
    return value.isoformat() + "T00:00:00.000000Z"


def parse_ts(text: str) -> datetime:
    """Parse an ISO-8601 date or datetime (naive means UTC); ValueError when it is not one."""
    s = text.strip()
    if len(s) == 10:
        return datetime.combine(date.fromisoformat(s), time.min, tzinfo=UTC)
    dt = datetime.fromisoformat(s.replace("z", "Z").replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@dataclass
class TaskQuery:
    """A validated task filter set; `Store.task_ids` turns it into SQL."""

    project: int
    statuses: list[str] = field(default_factory=list)  # ANDed with `status_in` if both given
    status_in: list[str] | None = None
    data_collection: int | None = None
    assignee: int | None = None
    unassigned: bool = False
    created_gte: str | None = None
    created_lte: str | None = None
    ids: list[int] | None = None
    limit: int | None = None  # the first N matching tasks in id order, before any id bound below
    id__gt: int | None = None
    id__gte: int | None = None
    id__lt: int | None = None
    id__lte: int | None = None
    descending: bool = False  # `ordering=-id`

    @property
    def ranged(self) -> bool:
        """An id-bounded or descending listing (a keyset read), answered without the id cache."""
        bounds = (self.id__gt, self.id__gte, self.id__lt, self.id__lte)
        return self.descending or any(b is not None for b in bounds)

    def unranged(self) -> TaskQuery:
        """The same filters without the id bounds and the ordering: the set the bounds cut."""
        return replace(self, id__gt=None, id__gte=None, id__lt=None, id__lte=None, descending=False)

    def where(self) -> tuple[str, list[Any]]:
        clauses = ["project_id = ?"]
        args: list[Any] = [self.project]
        for s in self.statuses:
            clauses.append("status = ?")
            args.append(s)
        if self.status_in is not None:
            if not self.status_in:
                clauses.append("0")
            else:
                clauses.append(f"status IN ({','.join('?' * len(self.status_in))})")
                args.extend(self.status_in)
        if self.data_collection is not None:
            clauses.append("data_unit_id IN (SELECT id FROM data_units WHERE data_collection_id = ?)")
            args.append(self.data_collection)
        if self.unassigned:
            clauses.append("assignee IS NULL")
        elif self.assignee is not None:
            clauses.append("assignee = ?")
            args.append(self.assignee)
        if self.created_gte is not None:
            clauses.append("created_at >= ?")
            args.append(self.created_gte)
        if self.created_lte is not None:
            clauses.append("created_at <= ?")
            args.append(self.created_lte)
        if self.ids is not None:
            if not self.ids:
                clauses.append("0")
            else:
                clauses.append(f"id IN ({','.join('?' * len(self.ids))})")
                args.extend(self.ids)
        for op, bound in ((">", self.id__gt), (">=", self.id__gte), ("<", self.id__lt), ("<=", self.id__lte)):
            if bound is not None:
                clauses.append(f"id {op} ?")
                args.append(bound)
        return " AND ".join(clauses), args

    def cut(self, ids: array) -> array:
        """The part of the sorted `ids` inside this query's id bounds, in its order."""
        lo, hi = 0, len(ids)
        if self.id__gt is not None:
            lo = max(lo, bisect_right(ids, self.id__gt))
        if self.id__gte is not None:
            lo = max(lo, bisect_left(ids, self.id__gte))
        if self.id__lt is not None:
            hi = min(hi, bisect_left(ids, self.id__lt))
        if self.id__lte is not None:
            hi = min(hi, bisect_right(ids, self.id__lte))
        part = ids[lo : max(lo, hi)]
        return part[::-1] if self.descending else part


class Store:
    """The embedded platform's data in one SQLite file (WAL, synchronous=NORMAL)."""

    def __init__(self, db_path: str | Path, *, busy_timeout_ms: int = 10_000):
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # Task id lists per filter set, valid while (data_version, _task_gen) is unchanged.
        self._id_cache: OrderedDict[tuple, tuple[tuple[int, int], array]] = OrderedDict()
        self._task_gen = 0
        self.conn = sqlite3.connect(
            str(self.db_path), isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000
        )
        c = self.conn
        c.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if c.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            c.execute("PRAGMA journal_mode = WAL")
        c.execute("PRAGMA synchronous = NORMAL")
        c.execute("PRAGMA foreign_keys = OFF")
        c.execute("PRAGMA temp_store = MEMORY")
        with self.transaction():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    c.execute(stmt)
            # a data dir made before projects had classes: add the column (NULL reads as no classes)
            if "classes" not in {row[1] for row in c.execute("PRAGMA table_info(projects)")}:
                c.execute("ALTER TABLE projects ADD COLUMN classes TEXT NULL")

    # -- plumbing ---------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self):
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): one writer at a time, no upgrade deadlocks."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def _one(self, sql: str, args: Sequence[Any] = ()) -> tuple | None:
        with self._lock:
            return self.conn.execute(sql, args).fetchone()

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self.conn.execute(sql, args).fetchall()

    def _insert(self, sql: str, args: Sequence[Any]) -> int:
        with self._lock:
            cur = self.conn.execute(sql, args)
            return int(cur.lastrowid or 0)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        """Run raw SQL (autocommit); tests use it to craft data the helpers would refuse."""
        with self._lock:
            self._task_gen += 1
            return self.conn.execute(sql, args)

    # -- projects, collections, specifications, data units, files ----------------------------------

    def create_data_collection(self, name: str, specs: Iterable[Mapping[str, Any]] = ()) -> int:
        """A data collection and its file specifications: each spec a mapping with `name` and
        optional `is_primary` (False), `is_required` (False), `file_type` ('image')."""
        with self.transaction() as c:
            dc_id = int(c.execute("INSERT INTO data_collections (name) VALUES (?)", (name,)).lastrowid or 0)
            c.executemany(
                "INSERT INTO file_specifications (data_collection_id, name, is_primary, is_required, file_type)"
                " VALUES (?, ?, ?, ?, ?)",
                [
                    (
                        dc_id,
                        s["name"],
                        int(bool(s.get("is_primary", False))),
                        int(bool(s.get("is_required", False))),
                        s.get("file_type", "image"),
                    )
                    for s in specs
                ],
            )
        return dc_id

    def create_project(
        self, title: str, data_collection_id: int | None = None, classes: list[str] | None = None
    ) -> int:
        """A project; `classes` are the names of its annotation classes (ids 1, 2, ... in order)."""
        listed = (
            None if classes is None else _dumps([{"id": i + 1, "name": n} for i, n in enumerate(classes)])
        )
        return self._insert(
            "INSERT INTO projects (title, data_collection_id, classes) VALUES (?, ?, ?)",
            (title, data_collection_id, listed),
        )

    def create_data_unit(
        self,
        data_collection_id: int,
        files: Mapping[str, Mapping[str, Any]] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> int:
        """A data unit with its files: `files` maps a specification name to
        `{"path": <relative to the media dir>} or {"url": <absolute>}` plus optional
        `file_name_original` (default: the path's or URL's last segment) and `is_primary`
        (default: the specification's)."""
        specs = {s["name"]: s for s in self.file_specifications(data_collection_id)}
        with self.transaction() as c:
            du_id = int(
                c.execute(
                    "INSERT INTO data_units (data_collection_id, meta) VALUES (?, ?)",
                    (data_collection_id, _dumps(dict(meta or {}))),
                ).lastrowid
                or 0
            )
            c.executemany(
                "INSERT INTO files (data_unit_id, specification_name, path, url, file_name_original, is_primary)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [_file_row(du_id, name, f, specs.get(name)) for name, f in (files or {}).items()],
            )
        return du_id

    def add_file(
        self,
        data_unit_id: int,
        specification_name: str,
        *,
        path: str | None = None,
        url: str | None = None,
        file_name_original: str | None = None,
        is_primary: bool = False,
    ) -> int:
        f = {"path": path, "url": url, "file_name_original": file_name_original, "is_primary": is_primary}
        return self._insert(
            "INSERT INTO files (data_unit_id, specification_name, path, url, file_name_original, is_primary)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            _file_row(data_unit_id, specification_name, f, None),
        )

    def create_data_units_bulk(
        self, data_collection_id: int, units: Sequence[Mapping[str, Any]]
    ) -> list[int]:
        """Many data units in one transaction: each item `{"files": {spec: {...}}, "meta": {...}}`.
        Returns their ids in order (contiguous)."""
        specs = {s["name"]: s for s in self.file_specifications(data_collection_id)}
        with self.transaction() as c:
            first = _next_id(c, "data_units")
            c.executemany(
                "INSERT INTO data_units (id, data_collection_id, meta) VALUES (?, ?, ?)",
                [
                    (first + i, data_collection_id, _dumps(dict(u.get("meta") or {})))
                    for i, u in enumerate(units)
                ],
            )
            c.executemany(
                "INSERT INTO files (data_unit_id, specification_name, path, url, file_name_original, is_primary)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    _file_row(first + i, name, f, specs.get(name))
                    for i, u in enumerate(units)
                    for name, f in (u.get("files") or {}).items()
                ),
            )
        return list(range(first, first + len(units)))

    def get_project(self, project_id: int) -> dict[str, Any] | None:
        r = self._one(
            "SELECT id, title, data_collection_id, classes FROM projects WHERE id = ?", (project_id,)
        )
        if r is None:
            return None
        return {
            "id": r[0],
            "title": r[1],
            "data_collection": r[2],
            "classes": json.loads(r[3]) if r[3] else [],
        }

    def get_data_collection(self, dc_id: int) -> dict[str, Any] | None:
        r = self._one("SELECT id, name FROM data_collections WHERE id = ?", (dc_id,))
        return None if r is None else {"id": r[0], "name": r[1]}

    def file_specifications(self, dc_id: int) -> list[dict[str, Any]]:
        rows = self._all(
            "SELECT id, name, is_primary, is_required, file_type FROM file_specifications"
            " WHERE data_collection_id = ? ORDER BY id",
            (dc_id,),
        )
        return [
            {"id": r[0], "name": r[1], "is_primary": bool(r[2]), "is_required": bool(r[3]), "file_type": r[4]}
            for r in rows
        ]

    def get_data_unit(self, du_id: int) -> dict[str, Any] | None:
        r = self._one("SELECT id, data_collection_id, meta FROM data_units WHERE id = ?", (du_id,))
        return None if r is None else {"id": r[0], "data_collection": r[1], "meta": _loads(r[2])}

    def data_unit_files(self, du_id: int) -> list[dict[str, Any]]:
        """The unit's files in id order, with the `file_type` of their specification (None if the
        specification does not exist in the unit's collection)."""
        rows = self._all(
            "SELECT f.id, f.specification_name, f.path, f.url, f.file_name_original, f.is_primary, fs.file_type"
            " FROM files f JOIN data_units du ON du.id = f.data_unit_id"
            " LEFT JOIN file_specifications fs"
            "   ON fs.data_collection_id = du.data_collection_id AND fs.name = f.specification_name"
            " WHERE f.data_unit_id = ? ORDER BY f.id",
            (du_id,),
        )
        return [
            {
                "id": r[0],
                "specification_name": r[1],
                "path": r[2],
                "url": r[3],
                "file_name_original": r[4],
                "is_primary": bool(r[5]),
                "file_type": r[6],
            }
            for r in rows
        ]

    def data_unit_with_files(self, du_id: int) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """`get_data_unit` and `data_unit_files` in one query (the hot path of an expanded task)."""
        rows = self._all(
            "SELECT du.id, du.data_collection_id, du.meta, f.id, f.specification_name, f.path, f.url,"
            " f.file_name_original, f.is_primary, fs.file_type"
            " FROM data_units du LEFT JOIN files f ON f.data_unit_id = du.id"
            " LEFT JOIN file_specifications fs"
            "   ON fs.data_collection_id = du.data_collection_id AND fs.name = f.specification_name"
            " WHERE du.id = ? ORDER BY f.id",
            (du_id,),
        )
        if not rows:
            return None
        du = {"id": rows[0][0], "data_collection": rows[0][1], "meta": _loads(rows[0][2])}
        files = [
            {
                "id": r[3],
                "specification_name": r[4],
                "path": r[5],
                "url": r[6],
                "file_name_original": r[7],
                "is_primary": bool(r[8]),
                "file_type": r[9],
            }
            for r in rows
            if r[3] is not None
        ]
        return du, files

    # -- users ------------------------------------------------------------------------------------

    def create_user(self, username: str) -> int:
        """The user's id, creating the user when it does not exist yet."""
        with self.transaction() as c:
            r = c.execute("SELECT id FROM users WHERE username = ?", (username,)).fetchone()
            if r is not None:
                return int(r[0])
            return int(c.execute("INSERT INTO users (username) VALUES (?)", (username,)).lastrowid or 0)

    def list_users(self) -> list[dict[str, Any]]:
        return [
            {"id": r[0], "username": r[1]} for r in self._all("SELECT id, username FROM users ORDER BY id")
        ]

    # -- tasks ------------------------------------------------------------------------------------

    def create_task(
        self,
        project_id: int,
        data_unit_id: int | None = None,
        *,
        status: str = "pending",
        assignee: int | None = None,
        created_at: datetime | date | str | None = None,
        data: Any = None,
    ) -> int:
        return self.create_tasks_bulk(
            project_id,
            [
                {
                    "data_unit": data_unit_id,
                    "status": status,
                    "assignee": assignee,
                    "created_at": created_at,
                    "data": data,
                }
            ],
        )[0]

    def create_tasks_bulk(self, project_id: int, tasks: Iterable[Mapping[str, Any]]) -> list[int]:
        """Many tasks in one transaction (executemany). Each item may give `data_unit`, `status`
        ('pending'), `assignee` (None), `created_at` (now), `data` ({}). Ids are contiguous."""
        now = utc_now()
        rows = []
        for t in tasks:
            created = t.get("created_at")
            created_s = now if created is None else format_ts(created)
            data = t.get("data")
            data_s = "{}" if data is None or data == {} else _dumps(data)
            rows.append(
                (
                    project_id,
                    t.get("data_unit"),
                    t.get("status") or "pending",
                    t.get("assignee"),
                    created_s,
                    created_s,
                    data_s,
                )
            )
        with self.transaction() as c:
            self._task_gen += 1
            first = _next_id(c, "tasks")
            c.executemany(
                "INSERT INTO tasks (id, project_id, data_unit_id, status, assignee, created_at, updated_at, data)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(first + i, *row) for i, row in enumerate(rows)],
            )
        return list(range(first, first + len(rows)))

    def get_task(self, task_id: int) -> dict[str, Any] | None:
        r = self._one(
            "SELECT id, project_id, data_unit_id, status, assignee, created_at, updated_at, data"
            " FROM tasks WHERE id = ?",
            (task_id,),
        )
        return None if r is None else _task(r)

    def update_task(self, task_id: int, **fields: Any) -> bool:
        """Set `status`, `assignee`, `data`, `data_unit` or `created_at` of a task directly."""
        cols = {"status": "status", "assignee": "assignee", "data": "data", "data_unit": "data_unit_id"}
        sets, args = [], []
        for k, v in fields.items():
            if k == "created_at":
                sets.append("created_at = ?")
                args.append(format_ts(v))
            elif k in cols:
                sets.append(f"{cols[k]} = ?")
                args.append(_dumps(v) if k == "data" else v)
            else:
                raise ValueError(f"unknown task field {k!r}")
        if not sets:
            return self.get_task(task_id) is not None
        sets.append("updated_at = ?")
        args.append(utc_now())
        with self._lock:
            if set(fields) - {"data"}:
                self._task_gen += 1
            cur = self.conn.execute(f"UPDATE tasks SET {', '.join(sets)} WHERE id = ?", (*args, task_id))
            return cur.rowcount > 0

    def count_tasks(self, query: TaskQuery) -> int:
        """How many tasks match (capped by `query.limit`)."""
        if query.ranged:
            return self._ranged_page(query, 0, 0)[0]
        return len(self._matching_ids(query))

    def task_ids(self, query: TaskQuery, offset: int = 0, limit: int | None = 100) -> list[int]:
        """Ids matching the query, in its order, from `offset` (at most `limit`; None = all)."""
        if query.ranged:
            return self._ranged_page(query, offset, _ALL if limit is None else limit)[1]
        ids = self._matching_ids(query)
        return list(ids[offset : None if limit is None else offset + limit])

    def task_page(self, query: TaskQuery, offset: int, limit: int) -> tuple[int, list[int]]:
        """`(count, ids)` of one page, as DRF's page-number pagination computes them per request.

        The matching ids are kept for the filter set while the matching could not have changed
        (no commit by another connection, per `PRAGMA data_version`, and no task write of ours
        other than annotation data), so paging through 200,000 tasks is not quadratic.
        """
        if query.ranged:
            return self._ranged_page(query, offset, limit)
        ids = self._matching_ids(query)
        return len(ids), list(ids[offset : offset + limit])

    def _ranged_page(self, query: TaskQuery, offset: int, limit: int) -> tuple[int, list[int]]:
        """An id-bounded (keyset) page: from the cached id list when it is current (a bisection),
        else by the `tasks_project` index, one page and the range's count, never the whole
        listing: tasks written while a run reads (`on_success`) make the cache stale on every page,
        and rebuilding it per page would cost the whole listing each time."""
        base = query.unranged()
        with self._lock:
            ids = self._cached_ids(base)
            if ids is None and base.limit is not None:
                ids = self._matching_ids(base)  # `limit` cuts the whole listing before the bounds
            if ids is not None:
                part = query.cut(ids)
                return len(part), list(part[offset : offset + limit])
            where, args = query.where()
            # (project_id, id, ...) covers every filter: a range scan in id order, whatever the
            # planner would guess for a status filter without statistics (a sort of the project)
            table = "tasks INDEXED BY tasks_project"
            count = self.conn.execute(f"SELECT COUNT(*) FROM {table} WHERE {where}", args).fetchone()[0]
            order = "DESC" if query.descending else "ASC"
            rows = self.conn.execute(
                f"SELECT id FROM {table} WHERE {where} ORDER BY id {order} LIMIT ? OFFSET ?",
                [*args, limit, offset],
            )
            return int(count), [r[0] for r in rows]

    def _cached_ids(self, query: TaskQuery) -> array | None:
        """The cached id list of `query`'s filters, if it is still current."""
        where, args = query.where()
        key = (where, tuple(args), query.limit)
        with self._lock:
            version = (self.conn.execute("PRAGMA data_version").fetchone()[0], self._task_gen)
            hit = self._id_cache.get(key)
            if hit is not None and hit[0] == version:
                self._id_cache.move_to_end(key)
                return hit[1]
            return None

    def _matching_ids(self, query: TaskQuery) -> array:
        assert not query.ranged, "an id-bounded query is cut from its unranged listing (_ranged_page)"
        where, args = query.where()
        key = (where, tuple(args), query.limit)
        with self._lock:
            hit = self._cached_ids(query)
            if hit is not None:
                return hit
            version = (self.conn.execute("PRAGMA data_version").fetchone()[0], self._task_gen)
            sql = f"SELECT id FROM tasks WHERE {where} ORDER BY id"
            if query.limit is not None:
                sql += " LIMIT ?"
                args = [*args, query.limit]
            ids = array("q", [r[0] for r in self.conn.execute(sql, args)])
            self._id_cache[key] = (version, ids)
            while len(self._id_cache) > _ID_CACHE_SIZE:
                self._id_cache.popitem(last=False)
            return ids

    def tasks_by_ids(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        if not ids:
            return []
        rows = self._all(
            "SELECT id, project_id, data_unit_id, status, assignee, created_at, updated_at, data FROM tasks"
            f" WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id",
            list(ids),
        )
        return [_task(r) for r in rows]

    def annotate_task(
        self, task_id: int, data: Any, *, action: str = "submit", schema: str | None = None
    ) -> dict[str, Any] | None:
        """Store `data` on the task and append a row to its annotation history, in one transaction.
        Returns the updated task, or None when there is no such task."""
        now = utc_now()
        text = _dumps(data)
        with self.transaction() as c:
            r = c.execute(
                "UPDATE tasks SET data = ?, updated_at = ? WHERE id = ?"
                " RETURNING id, project_id, data_unit_id, status, assignee, created_at, updated_at",
                (text, now, task_id),
            ).fetchone()
            if r is None:
                return None
            c.execute(
                "INSERT INTO annotation_history (task_id, action, schema, data, created_at) VALUES (?, ?, ?, ?, ?)",
                (task_id, action, schema, text, now),
            )
        return _task((*r, None)) | {"data": json.loads(text)}

    def history(self, task_id: int) -> list[dict[str, Any]]:
        """Every annotate write to the task, oldest first."""
        rows = self._all(
            "SELECT id, task_id, action, schema, data, created_at FROM annotation_history"
            " WHERE task_id = ? ORDER BY id",
            (task_id,),
        )
        return [
            {
                "id": r[0],
                "task_id": r[1],
                "action": r[2],
                "schema": r[3],
                "data": _loads(r[4]),
                "created_at": r[5],
            }
            for r in rows
        ]

    def history_counts(
        self, task_ids: Iterable[int] | None = None, project_id: int | None = None
    ) -> dict[int, int]:
        """How many annotate writes each task received (tasks without any are left out)."""
        sql = "SELECT h.task_id, COUNT(*) FROM annotation_history h"
        args: list[Any] = []
        if project_id is not None:
            sql += " JOIN tasks t ON t.id = h.task_id WHERE t.project_id = ?"
            args.append(project_id)
        sql += " GROUP BY h.task_id"
        counts = {int(r[0]): int(r[1]) for r in self._all(sql, args)}
        if task_ids is not None:
            wanted = set(task_ids)
            counts = {k: v for k, v in counts.items() if k in wanted}
        return counts

    # -- plugin releases, agents, serve applications ----------------------------------------------

    def create_plugin_release(self, code: str, version: str, config: Mapping[str, Any] | None = None) -> int:
        cfg = dict(config or {})
        cfg.setdefault("code", code)
        cfg.setdefault("version", version)
        return self._insert(
            "INSERT INTO plugin_releases (code, version, config) VALUES (?, ?, ?)",
            (code, version, _dumps(cfg)),
        )

    def get_plugin_release(self, release_id: int) -> dict[str, Any] | None:
        r = self._one("SELECT id, code, version, config FROM plugin_releases WHERE id = ?", (release_id,))
        return None if r is None else _release(r)

    def find_plugin_release(self, code: str, version: str | None = None) -> dict[str, Any] | None:
        """The release of `code` with that version, or the newest (highest id) one."""
        if version is None:
            r = self._one(
                "SELECT id, code, version, config FROM plugin_releases WHERE code = ? ORDER BY id DESC LIMIT 1",
                (code,),
            )
        else:
            r = self._one(
                "SELECT id, code, version, config FROM plugin_releases WHERE code = ? AND version = ?"
                " ORDER BY id DESC LIMIT 1",
                (code, version),
            )
        return None if r is None else _release(r)

    def create_agent(
        self, name: str, url: str | None = None, status: str = "connected", token: str | None = None
    ) -> int:
        return self._insert(
            "INSERT INTO agents (name, url, status, token) VALUES (?, ?, ?, ?)", (name, url, status, token)
        )

    def get_agent(self, agent_id: int) -> dict[str, Any] | None:
        r = self._one("SELECT id, name, url, status, token FROM agents WHERE id = ?", (agent_id,))
        return None if r is None else dict(zip(("id", "name", "url", "status", "token"), r, strict=True))

    def list_agents(
        self, *, agent_id: int | None = None, offset: int = 0, limit: int = 100
    ) -> tuple[int, list[dict]]:
        where, args = ("WHERE id = ?", [agent_id]) if agent_id is not None else ("", [])
        n = int(self._one(f"SELECT COUNT(*) FROM agents {where}", args)[0])  # type: ignore[index]
        rows = self._all(
            f"SELECT id, name, url, status, token FROM agents {where} ORDER BY id LIMIT ? OFFSET ?",
            (*args, limit, offset),
        )
        return n, [dict(zip(("id", "name", "url", "status", "token"), r, strict=True)) for r in rows]

    def create_serve_application(
        self,
        name: str,
        *,
        plugin_release_id: int | None = None,
        plugin_code: str | None = None,
        version: str | None = None,
        status: str = "NOT_STARTED",
        agent_id: int | None = None,
        job_id: int | None = None,
        route_prefix: str | None = None,
    ) -> int:
        _check_serve_status(status)
        if plugin_release_id is not None and (plugin_code is None or version is None):
            rel = self.get_plugin_release(plugin_release_id)
            if rel is not None:
                plugin_code = plugin_code or rel["plugin"]
                version = version or rel["version"]
        return self._insert(
            "INSERT INTO serve_applications (name, plugin_release_id, plugin_code, version, status, agent_id,"
            " job_id, route_prefix, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                name,
                plugin_release_id,
                plugin_code,
                version,
                status,
                agent_id,
                job_id,
                route_prefix,
                utc_now(),
            ),
        )

    def set_serve_application_status(self, app_id: int, status: str, **fields: Any) -> bool:
        """Set a serve application's status (one of SERVE_STATUSES) and optionally `job_id`,
        `route_prefix` or `agent_id`."""
        _check_serve_status(status)
        sets, args = ["status = ?"], [status]
        for k in ("job_id", "route_prefix", "agent_id"):
            if k in fields:
                sets.append(f"{k} = ?")
                args.append(fields.pop(k))
        if fields:
            raise ValueError(f"unknown serve application field(s): {sorted(fields)}")
        with self._lock:
            return (
                self.conn.execute(
                    f"UPDATE serve_applications SET {', '.join(sets)} WHERE id = ?", (*args, app_id)
                ).rowcount
                > 0
            )

    def get_serve_application(self, app_id: int) -> dict[str, Any] | None:
        r = self._one(f"SELECT {_SERVE_COLS} FROM serve_applications WHERE id = ?", (app_id,))
        return None if r is None else _serve(r)

    def list_serve_applications(
        self,
        *,
        plugin_code: str | None = None,
        agent_id: int | None = None,
        plugin_release_id: int | None = None,
        status: str | None = None,
        name: str | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> tuple[int, list[dict[str, Any]]]:
        clauses, args = [], []
        for col, val in (
            ("plugin_code", plugin_code),
            ("agent_id", agent_id),
            ("plugin_release_id", plugin_release_id),
            ("status", status),
            ("name", name),
        ):
            if val is not None:
                clauses.append(f"{col} = ?")
                args.append(val)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        n = int(self._one(f"SELECT COUNT(*) FROM serve_applications {where}", args)[0])  # type: ignore[index]
        rows = self._all(
            f"SELECT {_SERVE_COLS} FROM serve_applications {where} ORDER BY id LIMIT ? OFFSET ?",
            (*args, limit, offset),
        )
        return n, [_serve(r) for r in rows]

    # -- jobs and logs ----------------------------------------------------------------------------

    def create_job(
        self, action: str, params: Any = None, agent_id: int | None = None, status: str = "PENDING"
    ) -> int:
        _check_job_status(status)
        now = utc_now()
        return self._insert(
            "INSERT INTO jobs (action, status, params, agent_id, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            (action, status, _dumps({} if params is None else params), agent_id, now, now),
        )

    def get_job(self, job_id: int) -> dict[str, Any] | None:
        r = self._one(f"SELECT {_JOB_COLS} FROM jobs WHERE id = ?", (job_id,))
        return None if r is None else _job(r)

    def update_job(self, job_id: int, **fields: Any) -> bool:
        """Partial update of `status`, `progress_record`, `metrics_record`, `result`."""
        sets, args = [], []
        for k, v in fields.items():
            if k == "status":
                _check_job_status(v)
                sets.append("status = ?")
                args.append(v)
            elif k in ("progress_record", "metrics_record", "result"):
                sets.append(f"{k} = ?")
                args.append(None if v is None else _dumps(v))
            else:
                raise ValueError(f"unknown job field {k!r}")
        sets.append("updated_at = ?")
        args.append(utc_now())
        with self._lock:
            return (
                self.conn.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*args, job_id)).rowcount
                > 0
            )

    def add_logs(self, entries: Sequence[Mapping[str, Any]]) -> list[int]:
        """Append log events `{event, data, datetime, job, step, level}`; returns their ids."""
        now = utc_now()
        rows = [
            (
                e.get("job"),
                e["event"],
                None if e.get("data") is None else _dumps(e.get("data")),
                e.get("datetime") or now,
                e.get("step"),
                e.get("level"),
            )
            for e in entries
        ]
        with self.transaction() as c:
            first = _next_id(c, "logs")
            c.executemany(
                "INSERT INTO logs (id, job_id, event, data, datetime, step, level) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(first + i, *r) for i, r in enumerate(rows)],
            )
        return list(range(first, first + len(rows)))

    def logs(self, job_id: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT id, job_id, event, data, datetime, step, level FROM logs"
        args: list[Any] = []
        if job_id is not None:
            sql += " WHERE job_id = ?"
            args.append(job_id)
        rows = self._all(sql + " ORDER BY id", args)
        return [
            {
                "id": r[0],
                "job": r[1],
                "event": r[2],
                "data": _loads(r[3]),
                "datetime": r[4],
                "step": r[5],
                "level": r[6],
            }
            for r in rows
        ]


# -- row helpers ----------------------------------------------------------------------------------

_SERVE_COLS = (
    "id, name, status, plugin_release_id, plugin_code, version, agent_id, job_id, route_prefix, created_at"
)
_SERVE_KEYS = (
    "id",
    "name",
    "status",
    "plugin_release",
    "plugin_code",
    "version",
    "agent",
    "job",
    "route_prefix",
    "created_at",
)
_JOB_COLS = (
    "id, action, status, params, progress_record, metrics_record, result, agent_id, created_at, updated_at"
)


def _next_id(c: sqlite3.Connection, table: str) -> int:
    return int(c.execute(f"SELECT COALESCE(MAX(id), 0) + 1 FROM {table}").fetchone()[0])


def _file_row(du_id: int, spec_name: str, f: Mapping[str, Any], spec: Mapping[str, Any] | None) -> tuple:
    path, url = f.get("path"), f.get("url")
    if (path is None) == (url is None):
        raise ValueError(f"file {spec_name!r}: give exactly one of 'path' or 'url'")
    name = f.get("file_name_original")
    if name is None:
        name = str(path if path is not None else url).rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    primary = f.get("is_primary")
    if primary is None:
        primary = bool(spec and spec.get("is_primary"))
    return (du_id, spec_name, None if path is None else str(path), url, name, int(bool(primary)))


def _task(r: Sequence[Any]) -> dict[str, Any]:
    return {
        "id": r[0],
        "project": r[1],
        "data_unit": r[2],
        "status": r[3],
        "assignee": r[4],
        "created_at": r[5],
        "updated_at": r[6],
        "data": _loads(r[7]),
    }


def _release(r: Sequence[Any]) -> dict[str, Any]:
    config = _loads(r[3]) or {}
    if isinstance(config, dict):
        config.setdefault("code", r[1])
    return {"id": r[0], "plugin": r[1], "version": r[2], "config": config}


def _serve(r: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(_SERVE_KEYS, r, strict=True))


def _job(r: Sequence[Any]) -> dict[str, Any]:
    return {
        "id": r[0],
        "action": r[1],
        "status": r[2],
        "params": _loads(r[3]),
        "progress_record": _loads(r[4]),
        "metrics_record": _loads(r[5]),
        "result": _loads(r[6]),
        "agent": r[7],
        "created_at": r[8],
        "updated_at": r[9],
    }


def _check_job_status(status: str) -> None:
    if status not in JOB_STATUSES:
        raise ValueError(f"job status must be one of {', '.join(JOB_STATUSES)}")


def _check_serve_status(status: str) -> None:
    if status not in SERVE_STATUSES:
        raise ValueError(f"serve application status must be one of {', '.join(SERVE_STATUSES)}")
