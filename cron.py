"""Standard crontab(5) schedules: parse once, then ask for the next due minute.

    >>> from datetime import datetime, timezone
    >>> from cron import Cron
    >>> c = Cron("0 9 * * MON-FRI", tz="Europe/Berlin")
    >>> c.next_after(datetime(2024, 3, 29, 12, 0, tzinfo=timezone.utc)).isoformat()
    '2024-04-01T09:00:00+02:00'
    >>> c.matches(datetime(2024, 4, 1, 7, 0, 30, tzinfo=timezone.utc))
    True

This module is vendored on its own: it imports nothing from buquet, only the
standard library, and nothing but `datetime` at import time (`zoneinfo` is
imported when a time zone name is first given). Public names: `Cron` and
`CronError`; everything else is private.

Syntax
------
Five fields separated by blanks, matched against the wall clock of the cron's
time zone (UTC unless given)::

    field          values
    minute         0-59
    hour           0-23
    day-of-month   1-31
    month          1-12 or JAN-DEC
    day-of-week    0-7 or SUN-SAT (0 and 7 are both Sunday)

Each field is a comma-separated list of items; an item is `*`, a number or
name, or a range `a-b` (a <= b: ranges do not wrap around, so `FRI-MON` is an
error), optionally followed by a step `/s`: `*/15`, `10-50/5`, `MON-FRI/2`.
Names are the first three letters, in any case. A single value with a step,
`5/15`, means `5-59/15` (start there and step to the end of the field): the
original buquet, croniter and cronsim read it so, while Vixie cron and cronie
reject it. A step must be 1 to the field's maximum (cronie only warns about
`*/90` and then runs at minute 0 alone; a silent surprise is worse than an
error).

Macros, in any case: `@yearly` and `@annually` (`0 0 1 1 *`), `@monthly`
(`0 0 1 * *`), `@weekly` (`0 0 * * 0`), `@daily` and `@midnight`
(`0 0 * * *`), `@hourly` (`0 * * * *`). `@reboot` is rejected: it means "when
the daemon starts", which has no meaning for a schedule.

Day-of-month and day-of-week
----------------------------
As in cron: when both day fields are restricted, a day matches if EITHER
matches (`30 4 1,15 * 5` runs on the 1st, the 15th and every Friday);
otherwise both must match. "Restricted" follows Vixie cron and cronie to the
letter (and cronsim with them): a field that *starts with* `*` counts as
unrestricted even with a step, so `0 0 */2 * MON` means "odd days that are
Mondays" (AND), while `0 0 1-31/2 * MON` means "odd days, and every Monday"
(OR).

The original buquet (Rust `cron` crate) used another dialect: day-of-week
1-7 with 1 = Sunday (0 rejected), and day fields always AND-ed. Expressions
without a day-of-week restriction mean the same in both.

Time zones and daylight saving time
-----------------------------------
`tz` is None (UTC), an IANA name such as "Europe/Berlin" or a PEP 495
`tzinfo` (zoneinfo, `datetime.timezone`). When a zone's clocks jump, each
job behaves as it would under cronie (and Vixie cron, and cronsim, which
copies them); which rule applies depends on the expression, exactly as in
cron(8):

* Fixed-time jobs, whose minute and hour fields do not start with `*`
  (`30 2 * * *`, `0 9-17 * * *`, `@daily`):
  - a time skipped by a spring-forward jump runs once, at the first minute
    after the jump: `30 2 * * *` fires at 03:00 CEST on 2024-03-31 in
    Europe/Berlin (cron runs skipped jobs "immediately" after the change);
  - a time that occurs twice in a fall-back overlap runs once, at its first
    occurrence (`fold=0`): `30 2 * * *` fires at 02:30 CEST, not again at
    02:30 CET on 2024-10-27.
* Wildcard jobs, whose minute or hour field starts with `*` (`*/15 * * * *`,
  `30 * * * *`, `0 */2 * * *`, `@hourly`) follow the wall clock as it
  actually passes:
  - skipped times never run: `30 * * * *` has no 02:30 on 2024-03-31 in
    Berlin (the 01:30 and 03:30 runs are one hour apart);
  - repeated times run twice: `30 * * * *` fires at 02:30 CEST and again at
    02:30 CET on 2024-10-27, one hour apart.

Unlike cronie, a jump of any size follows these rules (cronie treats changes
of 3 hours or more as clock corrections). A fixed-time job that matches both
a skipped minute and the first minute after the jump runs once. Results are
always whole minutes of the zone's wall clock, also under the local mean
time offsets with seconds that zones had before about 1940.

Impossible expressions
----------------------
An expression that can never match (`0 0 30 2 *`, `0 0 31 4,6 *`) is
rejected by the constructor: with day fields AND-ed, some listed day must
exist in some listed month (February counts 29 days). Every other expression
matches at least once in any 400-year Gregorian cycle, so `next_after` always
returns, after at most a few hundred month steps; it raises OverflowError
only past year 9999.
"""

from datetime import date, datetime, timedelta, timezone, tzinfo

__all__ = ["Cron", "CronError"]

# ============================================================== constants

_MINUTE = timedelta(minutes=1)
_SECOND = timedelta(seconds=1)
_EPSILON = timedelta(microseconds=1)
_UTC = timezone.utc

# Wildcard jobs in a zone are searched one stretch of constant UTC offset at a
# time. Two assumptions about the tz database let a stretch be checked with
# two offset look-ups: two offset changes are never less than _WINDOW apart
# (the closest pair is 3.99 days: Africa/Freetown, 1939; 6.96 days since
# 1970), and one zone's offsets never differ by _WINDOW or more (the largest
# jump is 24 hours: Kwajalein, 1993).
_WINDOW = timedelta(days=2)

_FIELD_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week")
_MONTHS = "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split()
_DAYS = "SUN MON TUE WED THU FRI SAT".split()
# (low, high, names -> value, what the error says is expected)
_FIELDS = (
    (0, 59, {}, "0-59"),
    (0, 23, {}, "0-23"),
    (1, 31, {}, "1-31"),
    (1, 12, {n: i + 1 for i, n in enumerate(_MONTHS)}, "1-12 or JAN-DEC"),
    (0, 7, {n: i for i, n in enumerate(_DAYS)}, "0-7 or SUN-SAT"),
)
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTH_NAMES = (
    "", "January", "February", "March", "April", "May", "June", "July",
    "August", "September", "October", "November", "December",
)
_MAX_DAYS = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _days_in_month(year, month):
    if month == 2 and not (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)):
        return 28
    return _MAX_DAYS[month]


# ================================================================= errors


class CronError(ValueError):
    """A cron expression or time zone that cannot be used.

    The message is one line naming the field and the bad token, e.g.
    ``bad minute field '61' in '61 * * * *': expected 0-59``. The same facts
    are kept as attributes: `expr`, `field` (such as "minute", or None when the
    whole expression or the time zone is at fault) and `token`.
    """

    def __init__(self, message, *, expr=None, field=None, token=None):
        super().__init__(message)
        self.expr = expr
        self.field = field
        self.token = token


def _field_error(expr, index, token, reason):
    name = _FIELD_NAMES[index]
    return CronError(
        "bad %s field %r in %r: %s" % (name, token, expr, reason),
        expr=expr, field=name, token=token,
    )


def _expr_error(expr, reason):
    return CronError("bad cron expression %r: %s" % (expr, reason), expr=expr)


# ================================================================ parsing


def _value(text, index):
    """A number or name of field `index`, or None when it is neither."""
    if not text.isascii():  # isdigit() accepts '²' and upper() maps 'ſun' to 'SUN'
        return None
    low, high, names, _ = _FIELDS[index]
    if text.isdigit():
        value = int(text)
        return value if low <= value <= high else None
    return names.get(text.upper())


def _parse_field(expr, index, text):
    """Return the set of values that field `index` allows."""
    low, high, _, expected = _FIELDS[index]
    values = set()
    for item in text.split(","):
        if not item:
            raise _field_error(expr, index, text, "empty item in list")
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            step = int(step_text) if step_text.isdigit() and step_text.isascii() else 0
            if not 1 <= step <= high:
                raise _field_error(expr, index, item, "step must be 1-%d" % high)
        if base == "*":
            first, last = low, high
        else:
            start_text, dash, end_text = base.partition("-")
            first = _value(start_text, index)
            last = _value(end_text, index) if dash else first
            if first is None or last is None:
                raise _field_error(expr, index, item, "expected " + expected)
            if first > last:
                raise _field_error(
                    expr, index, item,
                    "start %s is greater than end %s (ranges do not wrap around)"
                    % (start_text, end_text),
                )
            if slash and not dash:
                last = high  # '5/15' is '5-59/15', as in croniter and cronsim
        values.update(range(first, last + 1, step))
    return values


def _bits(values):
    mask = 0
    for v in values:
        mask |= 1 << v
    return mask


def _next_table(values, high):
    """table[v] = the smallest allowed value >= v, None past the last one.

    One slot more than `high` so that "one past the end" needs no test.
    """
    table = [None] * (high + 2)
    following = None
    for v in range(high, -1, -1):
        if v in values:
            following = v
        table[v] = following
    return table


def _join(words):
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]


# =================================================================== Cron


class Cron:
    """A parsed cron expression in one time zone.

    `Cron(expr, tz=None)` parses and validates everything, raising CronError
    (a ValueError) with a one-line message. `tz` is None for UTC, an IANA
    name, or a tzinfo. Instances are immutable, hashable and compare equal
    when they have the same fields after parsing and the same tz (so
    "@daily" == "0 0 * * *" and "0 0 * * 7" == "0 0 * * SUN").

    Methods take aware datetimes in any time zone; a naive datetime raises
    TypeError, like comparing naive and aware datetimes does. Seconds and
    microseconds are never lost or rounded: `next_after` is strictly after
    the exact instant given.
    """

    __slots__ = (
        "_expr", "_tz", "_linear", "_fixed_time", "_and_days", "_key",
        "_minute_bits", "_hour_bits", "_dom_bits", "_month_bits", "_dow_bits",
        "_next_minute", "_next_hour", "_next_dom", "_next_month", "_dow_delta",
        "_day_mode",
    )

    def __init__(self, expr, tz=None):
        if not isinstance(expr, str):
            raise TypeError("cron expression must be a str, not %s" % type(expr).__name__)
        self._expr = expr
        self._tz = _resolve_tz(tz, expr)
        # datetime.timezone offsets never change, so no DST handling at all.
        self._linear = isinstance(self._tz, timezone)

        text = expr.strip()
        if text.startswith("@"):
            macro = text.lower()
            if macro == "@reboot":
                raise _expr_error(
                    expr, "@reboot means 'when the cron daemon starts' and has no "
                    "place in a schedule; use a time such as @daily",
                )
            if macro not in _MACROS:
                raise _expr_error(
                    expr, "unknown macro; expected @yearly, @annually, @monthly, "
                    "@weekly, @daily, @midnight or @hourly",
                )
            text = _MACROS[macro]
        fields = text.split()
        if len(fields) != 5:
            got = "nothing" if not fields else "%d fields" % len(fields)
            raise _expr_error(
                expr, "expected 5 fields (minute hour day-of-month month "
                "day-of-week) or a macro such as @daily, got " + got,
            )
        minutes, hours, doms, months, dows = (
            _parse_field(expr, i, f) for i, f in enumerate(fields)
        )
        if 7 in dows:  # 0 and 7 are both Sunday
            dows.discard(7)
            dows.add(0)

        # cronie's MIN_STAR/HR_STAR/DOM_STAR/DOW_STAR flags: the field's first
        # character is '*', whatever follows it.
        self._fixed_time = not (fields[0].startswith("*") or fields[1].startswith("*"))
        self._and_days = fields[2].startswith("*") or fields[4].startswith("*")

        if self._and_days and not any(
            d <= _MAX_DAYS[m] for m in months for d in doms
        ):
            days = " or ".join(str(d) for d in sorted(doms))
            names = [_MONTH_NAMES[m] for m in sorted(months)]
            raise _field_error(
                expr, 2, fields[2], "never matches: %s %s no day %s"
                % (_join(names), "has" if len(names) == 1 else "have", days),
            )

        self._minute_bits = _bits(minutes)
        self._hour_bits = _bits(hours)
        self._dom_bits = _bits(doms)
        self._month_bits = _bits(months)
        self._dow_bits = _bits(dows)
        self._next_minute = _next_table(minutes, 59)
        self._next_hour = _next_table(hours, 23)
        self._next_dom = _next_table(doms, 31)
        self._next_month = _next_table(months, 12)
        # _dow_delta[w] = days from weekday w (0 = Sunday) to the next allowed one
        self._dow_delta = [
            min((k for k in range(7) if (w + k) % 7 in dows)) for w in range(7)
        ]
        # How _next_day finds days: by day-of-month alone, by day-of-week
        # alone, by either (OR) or by both (AND of two restricted fields).
        all_doms, all_dows = len(doms) == 31, len(dows) == 7
        if self._and_days:
            self._day_mode = "dom" if all_dows else "dow" if all_doms else "both"
        elif all_doms or all_dows:  # OR with an unrestricted side: every day
            self._day_mode = "dom"
            self._next_dom = _next_table(range(1, 32), 31)
        else:
            self._day_mode = "either"
        days = {
            "dom": self._next_dom, "dow": self._dow_bits,
            "both": (self._dom_bits, self._dow_bits),
            "either": (self._dom_bits, self._dow_bits),
        }[self._day_mode]
        self._key = (
            self._minute_bits, self._hour_bits, self._month_bits,
            self._day_mode, tuple(days) if isinstance(days, list) else days,
            # DST handling differs only where offsets change.
            self._fixed_time or self._linear, self._tz,
        )

    # ------------------------------------------------------------ attributes

    @property
    def expr(self):
        """The expression exactly as given."""
        return self._expr

    @property
    def tz(self):
        """The tzinfo the expression is read in (`timezone.utc` by default)."""
        return self._tz

    def __repr__(self):
        if self._tz is _UTC:
            return "Cron(%r)" % (self._expr,)
        key = getattr(self._tz, "key", None)  # zoneinfo.ZoneInfo
        return "Cron(%r, tz=%r)" % (self._expr, key if isinstance(key, str) else self._tz)

    def __eq__(self, other):
        if not isinstance(other, Cron):
            return NotImplemented
        return self._key == other._key

    def __hash__(self):
        return hash(self._key)

    # ------------------------------------------------------------ public API

    def next_after(self, dt):
        """The first matching minute strictly after `dt`, in the cron's tz.

        `dt` is an aware datetime in any zone. The result is an aware
        datetime with `tzinfo=self.tz`, on a whole minute, with `fold` set
        when it is the second occurrence of a repeated wall time. Compare
        results with `.astimezone(timezone.utc)` or `.isoformat()`: Python
        compares two datetimes of one tzinfo by wall time, ignoring `fold`.
        """
        _check_aware(dt, "next_after")
        if self._linear:
            local = dt.astimezone(self._tz)
            y, mo, d, h, mi = self._next_wall(
                local.year, local.month, local.day, local.hour, local.minute + 1
            )
            return datetime(y, mo, d, h, mi, tzinfo=self._tz)
        if self._fixed_time:
            return self._next_fixed_time(dt)
        return self._next_wildcard(dt)

    def matches(self, dt):
        """Whether the minute containing `dt` is one `next_after` yields.

        In a zone with daylight saving time this follows the rules in the
        module docstring: for `30 2 * * *`, 03:00 on the spring-forward day
        matches and the second 02:30 on the fall-back day does not.
        """
        _check_aware(dt, "matches")
        local = dt.astimezone(self._tz)
        if self._linear or not self._fixed_time:
            return self._wall_matches(local)
        start = (dt.astimezone(_UTC) - timedelta(seconds=local.second,
                                                  microseconds=local.microsecond))
        found = self.next_after(start - _EPSILON)
        return found.astimezone(_UTC) == start

    # ------------------------------------------------------- wall-clock search

    def _wall_matches(self, t):
        if not (
            self._minute_bits >> t.minute & 1
            and self._hour_bits >> t.hour & 1
            and self._month_bits >> t.month & 1
        ):
            return False
        dom = self._dom_bits >> t.day & 1
        dow = self._dow_bits >> (t.isoweekday() % 7) & 1
        return (dom and dow) if self._and_days else (dom or dow)

    def _next_day(self, y, mo, d):
        """The first allowed day >= d in month (y, mo), or None."""
        last = _days_in_month(y, mo)
        if d > last:
            return None
        mode = self._day_mode
        if mode == "dom":
            found = self._next_dom[d]
        else:
            weekday = date(y, mo, d).isoweekday() % 7
            by_dow = d + self._dow_delta[weekday]
            if mode == "dow":
                found = by_dow
            elif mode == "either":
                found = self._next_dom[d]
                if found is None or by_dow < found:
                    found = by_dow
            else:  # "both": a '*'-led field with a step, e.g. "*/2" and "MON"
                dom_bits, dow_bits = self._dom_bits, self._dow_bits
                for day in range(d, last + 1):
                    if dom_bits >> day & 1 and dow_bits >> weekday & 1:
                        return day
                    weekday = (weekday + 1) % 7
                return None
        return found if found is not None and found <= last else None

    def _next_wall(self, y, mo, d, h, mi):
        """The first matching wall-clock minute >= the one given.

        Fields jump month -> day -> hour -> minute; a field that overflows
        (minute 60, hour 24, day 32) carries into the next one. Returns a
        (year, month, day, hour, minute) tuple.
        """
        next_month, next_hour, next_minute = self._next_month, self._next_hour, self._next_minute
        while True:
            found = next_month[mo] if mo <= 12 else None
            if found is None:
                y, mo, d, h, mi = y + 1, 1, 1, 0, 0
                if y > 9999:
                    raise OverflowError("no time matching %r before year 10000" % self._expr)
                continue
            if found != mo:
                mo, d, h, mi = found, 1, 0, 0
            found = self._next_day(y, mo, d)
            if found is None:
                mo, d, h, mi = mo + 1, 1, 0, 0
                continue
            if found != d:
                d, h, mi = found, 0, 0
            found = next_hour[h]
            if found is None:
                d, h, mi = d + 1, 0, 0
                continue
            if found != h:
                h, mi = found, 0
            found = next_minute[mi]
            if found is None:
                h, mi = h + 1, 0
                continue
            return y, mo, d, h, found

    def _next_wall_dt(self, wall, inclusive):
        """The first matching naive wall minute after `wall` (or at it)."""
        mi = wall.minute
        if not inclusive or wall.second or wall.microsecond:
            mi += 1
        return datetime(*self._next_wall(wall.year, wall.month, wall.day, wall.hour, mi))

    # ------------------------------------------------------- zones with DST

    def _next_fixed_time(self, dt):
        # Walk candidate wall times and give each one instant: its first
        # occurrence, or the end of the gap that swallowed it.
        tz = self._tz
        after = dt.astimezone(_UTC)
        local = dt.astimezone(tz)
        wall = local.replace(tzinfo=None, fold=0)
        if local.fold and _offsets(tz, wall)[0] > _offsets(tz, wall)[1]:
            # dt is in the second pass of a repeated hour: every repeated wall
            # time already ran in the first pass, so resume after the overlap.
            wall = _first_minute(wall, tz, _is_repeated) - _EPSILON
        candidate = self._next_wall_dt(wall, inclusive=False)
        while True:
            off0, off1 = _offsets(tz, candidate)
            if off0 < off1:  # skipped by a spring-forward jump
                instant = _first_minute(candidate, tz, _is_skipped).replace(tzinfo=tz)
            else:  # ordinary, or repeated: the first occurrence (fold=0)
                instant = candidate.replace(tzinfo=tz)
            if instant.astimezone(_UTC) > after:
                return instant
            # Defensive: after the skip above the first candidate is already
            # later than dt, unless a tzinfo leaves fold unset in a repeated
            # hour; candidates only grow, so this ends.
            candidate = self._next_wall_dt(candidate, inclusive=False)

    def _next_wildcard(self, dt):
        # Walk real time one stretch of constant UTC offset at a time and
        # match each stretch's wall clock; see _WINDOW for why it is exact.
        tz = self._tz
        start = dt.astimezone(_UTC).replace(tzinfo=None)
        inclusive = False
        while True:
            offset = _offset_at(tz, start)
            wall = self._next_wall_dt(start + offset, inclusive)
            instant = wall - offset
            limit = start + _WINDOW
            probe = instant if instant <= limit else limit
            if _offset_at(tz, probe) != offset:
                # The offset changes before the candidate: go on from there.
                start, inclusive = _transition(tz, start, probe, offset), True
            elif instant <= limit:
                return tz.fromutc(instant.replace(tzinfo=tz))
            else:
                # Nothing matches before `instant` in any offset: skip to
                # within a window of it and look for a change there.
                start, inclusive = max(limit, instant - _WINDOW), True


# ============================================================ helpers


def _resolve_tz(tz, expr):
    if tz is None:
        return _UTC
    if isinstance(tz, str):
        import zoneinfo  # only when a name is given: it costs a few ms

        try:
            return zoneinfo.ZoneInfo(tz)
        except (KeyError, ValueError, OSError):  # ZoneInfoNotFoundError is a KeyError
            raise CronError(
                "bad time zone %r: not an IANA time zone name such as 'Europe/Berlin' "
                "(without /usr/share/zoneinfo, install the tzdata package)" % tz,
                expr=expr, token=tz,
            ) from None
    if isinstance(tz, tzinfo):
        if hasattr(tz, "localize"):
            # pytz zones ignore PEP 495 fold and give LMT offsets via replace().
            raise TypeError("pytz time zones are not supported; use zoneinfo.ZoneInfo(%r)"
                            % str(tz))
        return tz
    raise TypeError("tz must be None, an IANA name or a tzinfo, not %s" % type(tz).__name__)


def _check_aware(dt, method):
    if not isinstance(dt, datetime):
        raise TypeError("%s() needs a datetime, not %s" % (method, type(dt).__name__))
    if dt.utcoffset() is None:
        raise TypeError(
            "%s() needs an aware datetime, got naive %s; attach a time zone, "
            "e.g. dt.replace(tzinfo=timezone.utc)" % (method, dt.isoformat())
        )


def _offsets(tz, wall):
    """UTC offsets of a naive wall time read with fold=0 and fold=1.

    Equal for an ordinary time; for a skipped time fold=0 gives the offset
    before the jump (the smaller one), for a repeated time fold=0 gives the
    first (the larger one). PEP 495.
    """
    return (wall.replace(tzinfo=tz).utcoffset(),
            wall.replace(tzinfo=tz, fold=1).utcoffset())


def _is_skipped(tz, wall):
    off0, off1 = _offsets(tz, wall)
    return off0 < off1


def _is_repeated(tz, wall):
    off0, off1 = _offsets(tz, wall)
    return off0 > off1


def _first_minute(wall, tz, inside):
    """The first whole wall minute after `wall` that is not `inside` the gap
    or overlap containing `wall`, found by bisection over its length."""
    off0, off1 = _offsets(tz, wall)
    base = wall.replace(second=0, microsecond=0)
    low, high = 0, -(-abs(off1 - off0) // _MINUTE)  # minutes; base+high is past it
    while high - low > 1:
        middle = (low + high) // 2
        if inside(tz, base + middle * _MINUTE):
            low = middle
        else:
            high = middle
    return base + high * _MINUTE


def _offset_at(tz, utc):
    """The UTC offset of `tz` at the naive UTC instant `utc`."""
    return tz.fromutc(utc.replace(tzinfo=tz)).utcoffset()


def _transition(tz, low, high, offset):
    """The first whole second in (low, high] whose offset is not `offset`.

    `low` has `offset` and `high` does not; _WINDOW guarantees one change.
    """
    base = low.replace(microsecond=0)
    lo, hi = 0, -(-(high - base) // _SECOND)
    while hi - lo > 1:
        middle = (lo + hi) // 2
        if _offset_at(tz, base + middle * _SECOND) == offset:
            lo = middle
        else:
            hi = middle
    return base + hi * _SECOND
