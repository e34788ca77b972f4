"""Tests for cron.py: syntax, error messages, day rules, DST, and a brute-force reference.

Times are compared as `isoformat()` strings, which carry the UTC offset: Python
compares two datetimes of one tzinfo by wall time and ignores `fold`, so `==`
cannot tell 02:30 CEST from 02:30 CET.
"""

import functools
import random
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from cron import Cron, CronError

UTC = timezone.utc
MINUTE = timedelta(minutes=1)
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(*args):
    return datetime(*args, tzinfo=UTC)


def iso(dt):
    return dt.isoformat()


def chain(cron, start, count):
    """The next `count` times after `start`, as isoformat strings."""
    out = []
    for _ in range(count):
        start = cron.next_after(start)
        out.append(iso(start))
    return out


def until(cron, start, end):
    """Every time `cron` yields in (start, end]."""
    out = []
    while True:
        start = cron.next_after(start)
        if start.astimezone(UTC) > end.astimezone(UTC):
            return out
        out.append(start)


# ======================================================= fields and syntax

# (field index, field text, the values it allows). Each is checked by walking
# next_after over one span of the field, so values come from behaviour.
FIELD_CASES = [
    (0, "*", list(range(60))),
    (0, "0", [0]),
    (0, "59", [59]),
    (0, "*/15", [0, 15, 30, 45]),
    (0, "10-50/5", list(range(10, 51, 5))),
    (0, "5/15", [5, 20, 35, 50]),
    (0, "0/20", [0, 20, 40]),
    (0, "58-59", [58, 59]),
    (0, "1,2,3,1", [1, 2, 3]),
    (0, "0-4,8-12/2,30", [0, 1, 2, 3, 4, 8, 10, 12, 30]),
    (0, "*/59", [0, 59]),
    (0, "07", [7]),
    (0, "5-5/3", [5]),
    (1, "*", list(range(24))),
    (1, "0", [0]),
    (1, "23", [23]),
    (1, "*/6", [0, 6, 12, 18]),
    (1, "9-17", list(range(9, 18))),
    (1, "22/1", [22, 23]),
    (1, "*/23", [0, 23]),
    (2, "*", list(range(1, 32))),
    (2, "1", [1]),
    (2, "31", [31]),
    (2, "*/10", [1, 11, 21, 31]),
    (2, "1-31/15", [1, 16, 31]),
    (2, "28/2", [28, 30]),
    (3, "*", list(range(1, 13))),
    (3, "1", [1]),
    (3, "12", [12]),
    (3, "*/3", [1, 4, 7, 10]),
    (3, "JAN", [1]),
    (3, "dec", [12]),
    (3, "Jun-Aug", [6, 7, 8]),
    (3, "jan-dec/4", [1, 5, 9]),
    (3, "FEB,apr,11", [2, 4, 11]),
    (3, "MAR/4", [3, 7, 11]),
    (4, "*", list(range(7))),
    (4, "0", [0]),
    (4, "7", [0]),
    (4, "0,7", [0]),
    (4, "6", [6]),
    (4, "1-5", [1, 2, 3, 4, 5]),
    (4, "MON-FRI", [1, 2, 3, 4, 5]),
    (4, "mon-fri", [1, 2, 3, 4, 5]),
    (4, "sun,Sat", [0, 6]),
    (4, "5-7", [0, 5, 6]),
    (4, "FRI-7", [0, 5, 6]),
    (4, "*/2", [0, 2, 4, 6]),
    (4, "1-7/2", [0, 1, 3, 5]),
    (4, "*/7", [0]),
    (4, "SUN-SAT", list(range(7))),
]


def values_of(index, text):
    """The values a field allows, observed through next_after in UTC."""
    if index == 0:  # minutes of 2024-01-01 00:xx
        cron = Cron("%s 0 1 1 *" % text)
        times = until(cron, utc(2023, 12, 31, 23, 59), utc(2024, 1, 1, 0, 59))
        return [t.minute for t in times]
    if index == 1:  # hours of 2024-01-01
        cron = Cron("0 %s 1 1 *" % text)
        times = until(cron, utc(2023, 12, 31, 23, 59), utc(2024, 1, 1, 23, 0))
        return [t.hour for t in times]
    if index == 2:  # days of January 2024
        cron = Cron("0 0 %s 1 *" % text)
        times = until(cron, utc(2023, 12, 31, 23, 59), utc(2024, 1, 31))
        return [t.day for t in times]
    if index == 3:  # months of 2024
        cron = Cron("0 0 1 %s *" % text)
        times = until(cron, utc(2023, 12, 31, 23, 59), utc(2024, 12, 1))
        return [t.month for t in times]
    cron = Cron("0 0 * * %s" % text)  # the week of Sunday 2024-01-07
    times = until(cron, utc(2024, 1, 6, 23, 59), utc(2024, 1, 13))
    return sorted(t.isoweekday() % 7 for t in times)


@pytest.mark.parametrize("index, text, expected", FIELD_CASES)
def test_each_field_allows_exactly_the_values_it_names(index, text, expected):
    assert values_of(index, text) == expected


def test_blanks_around_and_between_fields_do_not_matter():
    assert Cron("  0\t9  * *\n MON ") == Cron("0 9 * * MON")


def test_expr_keeps_the_text_exactly_as_given():
    assert Cron(" 0 9 * * mon ").expr == " 0 9 * * mon "


MACROS = [
    ("@yearly", "0 0 1 1 *"),
    ("@annually", "0 0 1 1 *"),
    ("@monthly", "0 0 1 * *"),
    ("@weekly", "0 0 * * 0"),
    ("@daily", "0 0 * * *"),
    ("@midnight", "0 0 * * *"),
    ("@hourly", "0 * * * *"),
    ("@DAILY", "0 0 * * *"),
    (" @Weekly ", "0 0 * * 0"),
]


@pytest.mark.parametrize("macro, expansion", MACROS)
def test_macros_mean_their_crontab_expansion(macro, expansion):
    assert Cron(macro) == Cron(expansion)
    start = utc(2024, 2, 27, 13, 7)
    assert chain(Cron(macro), start, 5) == chain(Cron(expansion), start, 5)


def test_hourly_is_a_wildcard_job_and_daily_a_fixed_time_one_as_in_cronie():
    # cronie sets HR_STAR for @hourly only; it decides the DST rule.
    start = datetime(2024, 10, 27, 1, 45, tzinfo=BERLIN)
    assert chain(Cron("@hourly", "Europe/Berlin"), start, 3) == [
        "2024-10-27T02:00:00+02:00",
        "2024-10-27T02:00:00+01:00",
        "2024-10-27T03:00:00+01:00",
    ]
    assert Cron("@daily", "Europe/Berlin") == Cron("0 0 * * *", "Europe/Berlin")


def test_sunday_is_both_0_and_7_and_sun():
    sundays = chain(Cron("0 12 * * 0"), utc(2024, 1, 1), 3)
    assert sundays == ["2024-01-07T12:00:00+00:00", "2024-01-14T12:00:00+00:00",
                       "2024-01-21T12:00:00+00:00"]
    assert chain(Cron("0 12 * * 7"), utc(2024, 1, 1), 3) == sundays
    assert chain(Cron("0 12 * * SUN"), utc(2024, 1, 1), 3) == sundays
    assert Cron("0 12 * * 7") == Cron("0 12 * * 0") == Cron("0 12 * * sun")


# ==================================================================== errors

# Whole messages for a sample of invalid expressions.
ERROR_MESSAGES = [
    ("61 * * * *", "bad minute field '61' in '61 * * * *': expected 0-59"),
    ("*/0 * * * *", "bad minute field '*/0' in '*/0 * * * *': step must be 1-59"),
    ("5-1 * * * *",
     "bad minute field '5-1' in '5-1 * * * *': start 5 is greater than end 1"
     " (ranges do not wrap around)"),
    ("0 0 1 FOO *", "bad month field 'FOO' in '0 0 1 FOO *': expected 1-12 or JAN-DEC"),
    ("0 24 * * *", "bad hour field '24' in '0 24 * * *': expected 0-23"),
    ("0 0 0 * *", "bad day-of-month field '0' in '0 0 0 * *': expected 1-31"),
    ("0 0 * 13 *", "bad month field '13' in '0 0 * 13 *': expected 1-12 or JAN-DEC"),
    ("0 0 * * 8", "bad day-of-week field '8' in '0 0 * * 8': expected 0-7 or SUN-SAT"),
    ("0 0 * * MONDAY",
     "bad day-of-week field 'MONDAY' in '0 0 * * MONDAY': expected 0-7 or SUN-SAT"),
    ("1,61 * * * *", "bad minute field '61' in '1,61 * * * *': expected 0-59"),
    ("1,,2 * * * *", "bad minute field '1,,2' in '1,,2 * * * *': empty item in list"),
    ("*/90 * * * *", "bad minute field '*/90' in '*/90 * * * *': step must be 1-59"),
    ("0 0 * * SAT-SUN",
     "bad day-of-week field 'SAT-SUN' in '0 0 * * SAT-SUN': start SAT is greater than"
     " end SUN (ranges do not wrap around)"),
    ("0 0 * * * *",
     "bad cron expression '0 0 * * * *': expected 5 fields (minute hour day-of-month"
     " month day-of-week) or a macro such as @daily, got 6 fields"),
    ("",
     "bad cron expression '': expected 5 fields (minute hour day-of-month month"
     " day-of-week) or a macro such as @daily, got nothing"),
    ("@fortnightly",
     "bad cron expression '@fortnightly': unknown macro; expected @yearly, @annually,"
     " @monthly, @weekly, @daily, @midnight or @hourly"),
    ("@reboot",
     "bad cron expression '@reboot': @reboot means 'when the cron daemon starts' and"
     " has no place in a schedule; use a time such as @daily"),
    ("0 0 30 2 *",
     "bad day-of-month field '30' in '0 0 30 2 *': never matches: February has no day 30"),
    ("0 0 31 4 *",
     "bad day-of-month field '31' in '0 0 31 4 *': never matches: April has no day 31"),
    ("0 0 31 4,6,9,11 *",
     "bad day-of-month field '31' in '0 0 31 4,6,9,11 *': never matches: April, June,"
     " September and November have no day 31"),
    ("0 0 30,31 FEB */2",
     "bad day-of-month field '30,31' in '0 0 30,31 FEB */2': never matches: February"
     " has no day 30 or 31"),
]


@pytest.mark.parametrize("expr, message", ERROR_MESSAGES)
def test_invalid_expressions_raise_one_line_messages_naming_field_and_token(expr, message):
    with pytest.raises(CronError) as caught:
        Cron(expr)
    assert str(caught.value) == message
    assert caught.value.expr == expr


def test_cron_error_is_a_value_error_carrying_field_and_token():
    with pytest.raises(ValueError) as caught:
        Cron("0 0 1 1,FOO *")
    assert isinstance(caught.value, CronError)
    assert (caught.value.field, caught.value.token) == ("month", "FOO")


BAD_TOKENS = [
    "", "-", "*/", "/5", "1-", "-1", "1--2", "1-2-3", "1/2/3", "**", "*-5", "*/*",
    "a", "1.5", "+1", "\u00b2", "\uff11", "5/0", "5/-1", "1-5/x", "?",
    "L", "1#2", "JANUARY", "SU", "0x1", "1-2/0", "\u017fun", "1-\u0661",
]
FIELD_LIMITS = [  # (name, first invalid below, first invalid above, largest step)
    ("minute", None, 60, 59),
    ("hour", None, 24, 23),
    ("day-of-month", 0, 32, 31),
    ("month", 0, 13, 12),
    ("day-of-week", None, 8, 7),
]


@pytest.mark.parametrize("index", range(5))
@pytest.mark.parametrize("token", BAD_TOKENS)
def test_malformed_tokens_are_rejected_in_every_field(index, token):
    fields = ["0", "0", "1", "1", "*"]
    fields[index] = token
    expr = " ".join(fields)
    if len(expr.split()) != 5:  # a token made of blanks changes the field count
        with pytest.raises(CronError, match="expected 5 fields"):
            Cron(expr)
        return
    with pytest.raises(CronError) as caught:
        Cron(expr)
    assert caught.value.field == FIELD_LIMITS[index][0]


@pytest.mark.parametrize("index", range(5))
def test_every_field_accepts_its_edges_and_rejects_one_past_them(index):
    name, below, above, max_step = FIELD_LIMITS[index]
    low = 0 if below is None else below + 1
    high = above - 1

    def expr(token):
        fields = ["0", "0", "1", "1", "*"]
        fields[index] = token
        return " ".join(fields)

    Cron(expr(str(low)))
    Cron(expr(str(high)))
    Cron(expr("%d-%d" % (low, high)))
    Cron(expr("*/%d" % max_step))
    for token in [str(above), "%d-%d" % (low, above), "*/%d" % (max_step + 1)] + (
        [] if below is None else [str(below)]
    ):
        with pytest.raises(CronError) as caught:
            Cron(expr(token))
        assert caught.value.field == name, token


def test_a_bad_time_zone_name_is_a_cron_error():
    with pytest.raises(CronError) as caught:
        Cron("0 9 * * *", tz="Mars/Olympus")
    assert str(caught.value) == (
        "bad time zone 'Mars/Olympus': not an IANA time zone name such as"
        " 'Europe/Berlin' (without /usr/share/zoneinfo, install the tzdata package)"
    )
    for name in ["", "europe/berlin", "Europe/Berlin ", "../etc/passwd", "/etc/localtime",
                 "Europe"]:
        with pytest.raises(CronError, match="bad time zone"):
            Cron("0 9 * * *", tz=name)


def test_wrong_types_are_type_errors():
    with pytest.raises(TypeError, match="must be a str"):
        Cron(None)
    with pytest.raises(TypeError, match="tz must be"):
        Cron("* * * * *", tz=3600)
    cron = Cron("* * * * *")
    with pytest.raises(TypeError, match="needs an aware datetime, got naive"):
        cron.next_after(datetime(2024, 1, 1))
    with pytest.raises(TypeError, match="needs an aware datetime"):
        cron.matches(datetime(2024, 1, 1))
    with pytest.raises(TypeError, match="needs a datetime, not date"):
        cron.next_after(date(2024, 1, 1))


# ============================================================ the object


def test_tz_defaults_to_utc_and_names_become_zoneinfo():
    assert Cron("* * * * *").tz is UTC
    assert Cron("* * * * *", tz="Europe/Berlin").tz is BERLIN
    fixed = timezone(timedelta(hours=5, minutes=30))
    assert Cron("* * * * *", tz=fixed).tz is fixed


def test_repr_shows_the_expression_and_a_zone_name():
    assert repr(Cron("*/15 * * * *")) == "Cron('*/15 * * * *')"
    assert repr(Cron("0 9 * * MON-FRI", "Europe/Berlin")) == \
        "Cron('0 9 * * MON-FRI', tz='Europe/Berlin')"
    assert repr(Cron("@daily", timezone(timedelta(hours=2)))) == \
        "Cron('@daily', tz=datetime.timezone(datetime.timedelta(seconds=7200)))"


def test_equal_crons_have_the_same_parsed_fields_and_tz():
    assert Cron("0 0 * * *") == Cron("@daily") == Cron("0 0 1-31 * *")
    assert hash(Cron("0 0 * * *")) == hash(Cron("@midnight"))
    assert Cron("0 9 * * 1-5") == Cron("0 9 * * MON-FRI")
    assert Cron("0 9 * * *") != Cron("0 9 * * *", tz="Europe/Berlin")
    assert Cron("0 9 1 * 1") != Cron("0 9 1 * */1")  # OR versus AND
    assert Cron("0-59 0-23 * * *") == Cron("* * * * *")  # in UTC, DST rules never apply
    assert Cron("0-59 0-23 * * *", "Europe/Berlin") != Cron("* * * * *", "Europe/Berlin")
    assert Cron("* * * * *") != "* * * * *"
    assert len({Cron("@daily"), Cron("0 0 * * *"), Cron("@hourly")}) == 2


def test_attributes_are_read_only():
    cron = Cron("* * * * *")
    with pytest.raises(AttributeError):
        cron.expr = "0 0 * * *"
    with pytest.raises(AttributeError):
        cron.tz = BERLIN


# =============================================== strictly after, seconds


def test_next_after_is_strictly_after_a_matching_minute():
    cron = Cron("0 9 * * *")
    assert iso(cron.next_after(utc(2024, 5, 1, 9, 0))) == "2024-05-02T09:00:00+00:00"
    assert iso(cron.next_after(utc(2024, 5, 1, 8, 59, 59, 999999))) == \
        "2024-05-01T09:00:00+00:00"


def test_seconds_and_microseconds_inside_a_matching_minute_count_as_after_it():
    cron = Cron("0 9 * * *")
    assert iso(cron.next_after(utc(2024, 5, 1, 9, 0, 0, 1))) == "2024-05-02T09:00:00+00:00"
    assert iso(cron.next_after(utc(2024, 5, 1, 9, 0, 30))) == "2024-05-02T09:00:00+00:00"
    every = Cron("* * * * *")
    assert iso(every.next_after(utc(2024, 5, 1, 9, 0, 59, 999999))) == \
        "2024-05-01T09:01:00+00:00"


def test_results_are_whole_minutes_in_the_crons_zone_whatever_zone_dt_is_in():
    cron = Cron("0 9 * * *", tz="Europe/Berlin")
    found = cron.next_after(datetime(2024, 5, 1, 12, 0, 17, 5, tzinfo=NEW_YORK))
    assert iso(found) == "2024-05-02T09:00:00+02:00"
    assert found.tzinfo is BERLIN
    fixed = timezone(timedelta(hours=-3, minutes=-30))
    found = Cron("15 * * * *", tz=fixed).next_after(utc(2024, 5, 1, 12, 50))
    assert iso(found) == "2024-05-01T10:15:00-03:30"


def test_matches_looks_at_the_whole_minute_containing_dt():
    cron = Cron("0 9 * * MON-FRI")
    assert cron.matches(utc(2024, 5, 1, 9, 0))
    assert cron.matches(utc(2024, 5, 1, 9, 0, 59, 999999))
    assert not cron.matches(utc(2024, 5, 1, 9, 1))
    assert not cron.matches(utc(2024, 5, 4, 9, 0))  # a Saturday
    assert cron.matches(datetime(2024, 5, 1, 5, 0, 30, tzinfo=NEW_YORK))


def test_month_ends_and_years_roll_over():
    assert chain(Cron("0 0 31 * *"), utc(2024, 1, 31), 4) == [
        "2024-03-31T00:00:00+00:00", "2024-05-31T00:00:00+00:00",
        "2024-07-31T00:00:00+00:00", "2024-08-31T00:00:00+00:00",
    ]
    assert chain(Cron("59 23 31 12 *"), utc(2024, 12, 31, 23, 59), 1) == [
        "2025-12-31T23:59:00+00:00"]
    assert chain(Cron("* * * * *"), utc(2024, 12, 31, 23, 59, 30), 2) == [
        "2025-01-01T00:00:00+00:00", "2025-01-01T00:01:00+00:00"]
    assert chain(Cron("0 0 30 * *"), utc(2024, 1, 30), 2) == [
        "2024-03-30T00:00:00+00:00", "2024-04-30T00:00:00+00:00"]


def test_february_29_waits_for_leap_years_and_skips_2100():
    cron = Cron("0 0 29 2 *")
    assert chain(cron, utc(2024, 3, 1), 3) == [
        "2028-02-29T00:00:00+00:00", "2032-02-29T00:00:00+00:00",
        "2036-02-29T00:00:00+00:00"]
    assert chain(cron, utc(2096, 3, 1), 1) == ["2104-02-29T00:00:00+00:00"]
    assert chain(cron, utc(2000, 2, 28, 23, 59), 1) == ["2000-02-29T00:00:00+00:00"]
    assert cron.matches(utc(2024, 2, 29, 0, 0, 30))
    assert not cron.matches(utc(2024, 3, 1))


def test_a_feb_29_that_must_also_be_a_sunday_comes_decades_apart():
    # '*/7' starts with '*', so the day fields are AND-ed: Feb 29 on a Sunday.
    found = Cron("0 0 29 2 */7").next_after(utc(2021, 1, 1))
    assert iso(found) == "2032-02-29T00:00:00+00:00"
    assert found.isoweekday() == 7
    assert iso(Cron("0 0 29 2 */7").next_after(found)) == "2060-02-29T00:00:00+00:00"


def test_day_31_in_february_is_fine_when_day_of_week_can_match_instead():
    # Both day fields restricted: OR, so the Mondays of February match.
    assert chain(Cron("0 0 31 2 MON"), utc(2024, 1, 1), 2) == [
        "2024-02-05T00:00:00+00:00", "2024-02-12T00:00:00+00:00"]


def test_next_after_raises_overflow_error_past_year_9999():
    with pytest.raises(OverflowError, match="before year 10000"):
        Cron("0 0 1 1 *").next_after(utc(9999, 6, 1))
    assert iso(Cron("* * * * *").next_after(utc(9999, 12, 31, 23, 58))) == \
        "9999-12-31T23:59:00+00:00"


# ============================================== day-of-month, day-of-week


def test_both_day_fields_restricted_means_either_matches():
    # crontab(5): "30 4 1,15 * 5" runs on the 1st, the 15th and every Friday.
    days = [t[:10] for t in chain(Cron("30 4 1,15 * 5"), utc(2024, 2, 29), 6)]
    assert days == ["2024-03-01", "2024-03-08", "2024-03-15", "2024-03-22",
                    "2024-03-29", "2024-04-01"]


def test_a_star_day_of_week_means_day_of_month_alone():
    days = [t[:10] for t in chain(Cron("0 0 1,15 * *"), utc(2024, 2, 29), 3)]
    assert days == ["2024-03-01", "2024-03-15", "2024-04-01"]


def test_a_star_day_of_month_means_day_of_week_alone():
    days = [t[:10] for t in chain(Cron("0 0 * * FRI"), utc(2024, 2, 29), 3)]
    assert days == ["2024-03-01", "2024-03-08", "2024-03-15"]


def test_a_field_starting_with_star_counts_as_unrestricted_as_in_cronie():
    # '*/2' starts with '*': AND, so odd days that are Mondays.
    days = [t[:10] for t in chain(Cron("0 0 */2 * MON"), utc(2023, 12, 31), 4)]
    assert days == ["2024-01-01", "2024-01-15", "2024-01-29", "2024-02-05"]
    # '1-31/2' is the same set of days but restricted: OR, odd days or Mondays.
    days = [t[:10] for t in chain(Cron("0 0 1-31/2 * MON"), utc(2024, 1, 1), 4)]
    assert days == ["2024-01-03", "2024-01-05", "2024-01-07", "2024-01-08"]
    # Likewise in day-of-week: '*/2' (Sun, Tue, Thu, Sat) AND the 1st.
    days = [t[:10] for t in chain(Cron("0 0 1 * */2"), utc(2024, 1, 1), 3)]
    assert days == ["2024-02-01", "2024-06-01", "2024-08-01"]


# ======================================================= daylight saving

# Europe/Berlin 2024: 02:00 CET -> 03:00 CEST on March 31, 03:00 CEST ->
# 02:00 CET on October 27. America/New_York 2024: 02:00 EST -> 03:00 EDT on
# March 10, 02:00 EDT -> 01:00 EST on November 3.
DST_CASES = [
    # A fixed time skipped by the jump runs at the first minute after it.
    ("30 2 * * *", "Europe/Berlin", utc(2024, 3, 30, 12), [
        "2024-03-31T03:00:00+02:00", "2024-04-01T02:30:00+02:00"]),
    ("0 2 * * *", "Europe/Berlin", utc(2024, 3, 30, 12), [
        "2024-03-31T03:00:00+02:00", "2024-04-01T02:00:00+02:00"]),
    ("15,45 2 * * *", "Europe/Berlin", utc(2024, 3, 30, 12), [
        "2024-03-31T03:00:00+02:00", "2024-04-01T02:15:00+02:00"]),
    ("0,30 2,3 * * *", "Europe/Berlin", utc(2024, 3, 30, 12), [
        "2024-03-31T03:00:00+02:00", "2024-03-31T03:30:00+02:00",
        "2024-04-01T02:00:00+02:00"]),
    ("30 2 * * *", "America/New_York", utc(2024, 3, 9, 12), [
        "2024-03-10T03:00:00-04:00", "2024-03-11T02:30:00-04:00"]),
    # A fixed time that occurs twice runs once, at its first occurrence.
    ("30 2 * * *", "Europe/Berlin", utc(2024, 10, 26, 12), [
        "2024-10-27T02:30:00+02:00", "2024-10-28T02:30:00+01:00"]),
    ("0,59 2 * * *", "Europe/Berlin", utc(2024, 10, 26, 12), [
        "2024-10-27T02:00:00+02:00", "2024-10-27T02:59:00+02:00",
        "2024-10-28T02:00:00+01:00"]),
    ("30 1 * * *", "America/New_York", utc(2024, 11, 2, 12), [
        "2024-11-03T01:30:00-04:00", "2024-11-04T01:30:00-05:00"]),
    ("0-59/20 1 * * *", "America/New_York", utc(2024, 11, 2, 12), [
        "2024-11-03T01:00:00-04:00", "2024-11-03T01:20:00-04:00",
        "2024-11-03T01:40:00-04:00", "2024-11-04T01:00:00-05:00"]),
    # A wildcard job skips the times that do not exist...
    ("30 * * * *", "Europe/Berlin", utc(2024, 3, 30, 23, 45), [
        "2024-03-31T01:30:00+01:00", "2024-03-31T03:30:00+02:00"]),
    ("*/20 2 * * *", "America/New_York", utc(2024, 3, 9, 12), [
        "2024-03-11T02:00:00-04:00", "2024-03-11T02:20:00-04:00"]),
    ("*/30 * * * *", "America/New_York", utc(2024, 3, 10, 6, 15), [
        "2024-03-10T01:30:00-05:00", "2024-03-10T03:00:00-04:00",
        "2024-03-10T03:30:00-04:00"]),
    # ...and runs the repeated ones twice.
    ("30 * * * *", "Europe/Berlin", utc(2024, 10, 26, 23, 15), [
        "2024-10-27T01:30:00+02:00", "2024-10-27T02:30:00+02:00",
        "2024-10-27T02:30:00+01:00", "2024-10-27T03:30:00+01:00"]),
    ("*/20 1 * * *", "America/New_York", utc(2024, 11, 3, 4), [
        "2024-11-03T01:00:00-04:00", "2024-11-03T01:20:00-04:00",
        "2024-11-03T01:40:00-04:00", "2024-11-03T01:00:00-05:00",
        "2024-11-03T01:20:00-05:00", "2024-11-03T01:40:00-05:00",
        "2024-11-04T01:00:00-05:00"]),
    ("0 */2 * * *", "Europe/Berlin", utc(2024, 10, 26, 23, 30), [
        "2024-10-27T02:00:00+02:00", "2024-10-27T02:00:00+01:00",
        "2024-10-27T04:00:00+01:00"]),
    # Far ahead, across many transitions, in either mode, landing in a
    # repeated hour (first pass first) or in a gap (skipped for a year).
    ("*/20 2 27 10 *", "Europe/Berlin", utc(2024, 2, 1), [
        "2024-10-27T02:00:00+02:00", "2024-10-27T02:20:00+02:00",
        "2024-10-27T02:40:00+02:00", "2024-10-27T02:00:00+01:00"]),
    ("*/20 2 31 3 *", "Europe/Berlin", utc(2023, 11, 1), [
        "2025-03-31T02:00:00+02:00"]),
    ("20 2 31 3 *", "Europe/Berlin", utc(2023, 11, 1), [
        "2024-03-31T03:00:00+02:00", "2025-03-31T02:20:00+02:00"]),
    ("* * 29 2 *", "Europe/Berlin", utc(2024, 3, 1), [
        "2028-02-29T00:00:00+01:00", "2028-02-29T00:01:00+01:00"]),
    ("0 0 29 2 *", "America/New_York", utc(2024, 3, 1), ["2028-02-29T00:00:00-05:00"]),
]


@pytest.mark.parametrize("expr, zone, start, expected", DST_CASES)
def test_dst_gaps_and_overlaps_follow_cronie(expr, zone, start, expected):
    assert chain(Cron(expr, tz=zone), start, len(expected)) == expected


def test_a_fixed_time_job_started_in_the_second_pass_waits_for_the_next_day():
    cron = Cron("30 1 * * *", tz="America/New_York")
    second_pass = datetime(2024, 11, 3, 1, 15, fold=1, tzinfo=NEW_YORK)
    assert iso(cron.next_after(second_pass)) == "2024-11-04T01:30:00-05:00"
    first_pass = datetime(2024, 11, 3, 1, 15, fold=0, tzinfo=NEW_YORK)
    assert iso(cron.next_after(first_pass)) == "2024-11-03T01:30:00-04:00"


def test_a_wildcard_job_started_late_in_the_first_pass_returns_to_the_repeat():
    cron = Cron("10 * * * *", tz="Europe/Berlin")
    late_first_pass = datetime(2024, 10, 27, 2, 50, tzinfo=BERLIN)
    assert chain(cron, late_first_pass, 2) == [
        "2024-10-27T02:10:00+01:00", "2024-10-27T03:10:00+01:00"]


def test_matches_agrees_with_the_dst_rules():
    fixed = Cron("30 2 * * *", tz="Europe/Berlin")
    assert fixed.matches(datetime(2024, 3, 31, 3, 0, tzinfo=BERLIN))
    assert not fixed.matches(datetime(2024, 3, 31, 3, 30, tzinfo=BERLIN))
    assert fixed.matches(datetime(2024, 10, 27, 2, 30, 10, tzinfo=BERLIN))
    assert not fixed.matches(datetime(2024, 10, 27, 2, 30, 10, fold=1, tzinfo=BERLIN))
    wildcard = Cron("30 * * * *", tz="Europe/Berlin")
    assert not wildcard.matches(datetime(2024, 3, 31, 3, 0, tzinfo=BERLIN))
    assert wildcard.matches(datetime(2024, 10, 27, 2, 30, fold=0, tzinfo=BERLIN))
    assert wildcard.matches(datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=BERLIN))


def test_a_whole_skipped_day_runs_fixed_jobs_at_the_first_minute_after_it():
    # Samoa skipped 2011-12-30 when it moved across the date line (-10 to +14).
    fixed = Cron("0 12 30 12 *", tz="Pacific/Apia")
    assert iso(fixed.next_after(utc(2011, 12, 29))) == "2011-12-31T00:00:00+14:00"
    wildcard = Cron("* 12 30 12 *", tz="Pacific/Apia")
    assert iso(wildcard.next_after(utc(2011, 12, 29))) == "2012-12-30T12:00:00+14:00"


# ================================================== brute-force reference


class Spec:
    """A random expression with the sets it means, computed independently."""

    RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]

    def __init__(self, rnd, hours=None, only_on=None):
        """hours: (text, values) choices for the hour field, used 60% of the
        time; only_on: a date, making day-of-month and month name it."""
        self.fields, self.sets = [], []
        for index, (low, high) in enumerate(self.RANGES):
            text, values = self._field(rnd, index, low, high)
            if index == 1 and hours is not None and rnd.random() < 0.6:
                text, values = rnd.choice(hours)
            if only_on is not None and index >= 2:
                value = [only_on.day, only_on.month, None][index - 2]
                text, values = ("*", set(range(8))) if value is None else (str(value), {value})
            self.fields.append(text)
            self.sets.append(values)
        self.sets[4] = {0 if v == 7 else v for v in self.sets[4]}
        self.expr = " ".join(self.fields)
        self.and_days = self.fields[2][0] == "*" or self.fields[4][0] == "*"
        self.fixed_time = self.fields[0][0] != "*" and self.fields[1][0] != "*"

    @staticmethod
    def _item(rnd, index, low, high):
        names = {3: "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split(),
                 4: "SUN MON TUE WED THU FRI SAT".split()}.get(index)

        def show(v):
            if names and v - low < len(names) and rnd.random() < 0.3:
                name = names[v - low]
                return rnd.choice([name, name.lower(), name.title()])
            return str(v)

        kind = rnd.random()
        if kind < 0.15:
            return "*", set(range(low, high + 1))
        if kind < 0.3:
            step = rnd.randint(1, high)
            return "*/%d" % step, set(range(low, high + 1, step))
        a = rnd.randint(low, high)
        if kind < 0.6:
            return show(a), {a}
        b = rnd.randint(a, high)
        if kind < 0.75:
            return "%s-%s" % (show(a), show(b)), set(range(a, b + 1))
        step = rnd.randint(1, high)
        if kind < 0.9:
            return "%s-%s/%d" % (show(a), show(b), step), set(range(a, b + 1, step))
        return "%s/%d" % (show(a), step), set(range(a, high + 1, step))

    def _field(self, rnd, index, low, high):
        if index >= 2 and rnd.random() < 0.5:
            return "*", set(range(low, high + 1))
        texts, values = [], set()
        for _ in range(1 if rnd.random() < 0.7 else rnd.randint(2, 4)):
            text, items = self._item(rnd, index, low, high)
            texts.append(text)
            values |= items
        return ",".join(texts), values

    def day_matches(self, day):
        dom = day.day in self.sets[2]
        dow = day.isoweekday() % 7 in self.sets[4]
        month = day.month in self.sets[3]
        return month and ((dom and dow) if self.and_days else (dom or dow))

    def wall_matches(self, t):
        return (t.minute in self.sets[0] and t.hour in self.sets[1]
                and self.day_matches(t))

    def possible(self):
        if not self.and_days:
            return True
        return any(d <= [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][m - 1]
                   for m in self.sets[3] for d in self.sets[2])


def reference_next(spec, dt, horizon_days):
    """First matching UTC minute after dt by scanning days, then minutes."""
    first = dt.replace(second=0, microsecond=0, tzinfo=None) + MINUTE
    day = first.date()
    for _ in range(horizon_days):
        if spec.day_matches(day):
            start = first.hour * 60 + first.minute if day == first.date() else 0
            for minute_of_day in range(start, 1440):
                hour, minute = divmod(minute_of_day, 60)
                if hour in spec.sets[1] and minute in spec.sets[0]:
                    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)
        day += timedelta(days=1)
    return None


def reference_fires(spec, tz, start, end):
    """Every fire time in (start, end] by scanning UTC minutes, applying the
    cronie rules to each minute's wall clock. start and end are UTC minutes."""
    fires = []
    t = start
    previous_wall = t.astimezone(tz).replace(tzinfo=None, fold=0)
    while t < end:
        t += MINUTE
        local = t.astimezone(tz)
        wall = local.replace(tzinfo=None, fold=0)
        if not spec.fixed_time:
            fire = spec.wall_matches(wall)
        elif wall - previous_wall > MINUTE:  # just jumped forward: skipped walls run now
            skipped = (wall - previous_wall) // MINUTE
            fire = any(spec.wall_matches(previous_wall + k * MINUTE)
                       for k in range(1, skipped + 1))
        elif local.fold:  # the second pass of a repeated wall time
            fire = False
        else:
            fire = spec.wall_matches(wall)
        previous_wall = wall
        if fire:
            fires.append(local)
    return fires


def random_instant(rnd, low_year, high_year):
    seconds = rnd.randrange(int((datetime(high_year, 1, 1) - datetime(low_year, 1, 1))
                                .total_seconds()))
    dt = datetime(low_year, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
    return dt.replace(second=rnd.choice([0, 0, rnd.randrange(60)]),
                      microsecond=rnd.choice([0, 0, rnd.randrange(10 ** 6)]))


def test_next_after_and_matches_agree_with_a_minute_scan_on_random_expressions():
    rnd = random.Random(20240501)
    horizon = 3000  # days: past the longest Feb 29 wait (8 years)
    checked = 0
    while checked < 2000:
        spec = Spec(rnd)
        if not spec.possible():
            with pytest.raises(CronError, match="never matches"):
                Cron(spec.expr)
            continue
        cron = Cron(spec.expr)
        dt = random_instant(rnd, 1990, 2060)
        expected = reference_next(spec, dt, horizon)
        found = cron.next_after(dt)
        if expected is None:
            assert found > dt + timedelta(days=horizon - 1), spec.expr
        else:
            assert iso(found) == iso(expected), (spec.expr, iso(dt))
            assert cron.matches(found), spec.expr
            assert not cron.matches(found - MINUTE) or \
                iso(cron.next_after(found - 2 * MINUTE)) == iso(found - MINUTE)
        probe = random_instant(rnd, 1990, 2060)
        assert cron.matches(probe) == spec.wall_matches(probe), (spec.expr, iso(probe))
        checked += 1


@functools.lru_cache(maxsize=None)
def transitions(tz, year):
    """The UTC instants in `year` where tz's offset changes, found by bisection."""
    out = []
    t = datetime(year, 1, 1, tzinfo=UTC)
    end = datetime(year + 1, 1, 1, tzinfo=UTC)
    step = timedelta(hours=6)
    while t < end:
        if t.astimezone(tz).utcoffset() != (t + step).astimezone(tz).utcoffset():
            low, high = t, t + step
            while high - low > MINUTE:
                middle = low + (high - low) / 2
                middle = middle.replace(second=0, microsecond=0)
                if middle.astimezone(tz).utcoffset() == low.astimezone(tz).utcoffset():
                    low = middle
                else:
                    high = middle
            out.append(high)
        t += step
    return out


DST_ZONES = [
    ("Europe/Berlin", 2024, 70),
    ("America/New_York", 2024, 70),
    ("Australia/Lord_Howe", 2024, 20),   # 30-minute shifts
    ("America/Havana", 2024, 20),        # 00:00 -> 01:00 and 01:00 -> 00:00
    ("America/Sao_Paulo", 2018, 20),     # a day starting at 01:00
]


@pytest.mark.parametrize("zone, year, count", DST_ZONES)
def test_dst_zones_agree_with_a_utc_minute_scan_across_both_transitions(zone, year, count):
    tz = ZoneInfo(zone)
    moments = transitions(tz, year)
    assert len(moments) == 2 or zone == "America/Sao_Paulo"
    rnd = random.Random(zone)
    # Hours around the transitions (local 22:00-04:00) make DST effects likely.
    near = [("%d" % h, {h}) for h in (23, 0, 1, 2, 3)] + [
        ("0-3", {0, 1, 2, 3}), ("1,2", {1, 2}), ("2-3", {2, 3}), ("*/2", set(range(0, 24, 2))),
        ("22-23,0-2", {22, 23, 0, 1, 2})]
    checked = 0
    while checked < count:
        spec = Spec(rnd, hours=near)
        if spec.sets[3] != set(range(1, 13)) or not spec.possible():
            continue
        cron = Cron(spec.expr, tz=zone)
        moment = rnd.choice(moments)
        start = moment - timedelta(minutes=rnd.randrange(60, 1500))
        end = moment + timedelta(hours=26)
        expected = [iso(t) for t in reference_fires(spec, tz, start, end)]
        assert [iso(t) for t in until(cron, start, end)] == expected, spec.expr
        # matches() minute by minute through the transition's neighbourhood
        fired = set(expected)
        t = max(start + MINUTE, moment - timedelta(hours=2))
        while t < moment + timedelta(hours=2):
            local = t.astimezone(tz)
            assert cron.matches(t + timedelta(seconds=30)) == (iso(local) in fired), \
                (spec.expr, iso(local))
            t += MINUTE
        checked += 1


@pytest.mark.parametrize("zone, year, count", DST_ZONES)
def test_dst_zones_agree_with_the_scan_when_starting_months_before_a_transition(
        zone, year, count):
    # The expression can only match on the transition's local date, so the
    # scan need only cover that day while next_after starts months earlier
    # (and so takes its long-jump path into the gap or overlap).
    tz = ZoneInfo(zone)
    rnd = random.Random("far " + zone)
    near = [("%d" % h, {h}) for h in (23, 0, 1, 2, 3)] + [
        ("0-3", {0, 1, 2, 3}), ("1,2", {1, 2}), ("*/2", set(range(0, 24, 2)))]
    for _ in range(count // 2):
        moment = rnd.choice(transitions(tz, year))
        day = (moment - timedelta(hours=1)).astimezone(tz).date()
        spec = Spec(rnd, hours=near, only_on=day)
        cron = Cron(spec.expr, tz=zone)
        start = moment - timedelta(days=rnd.randrange(10, 300), minutes=rnd.randrange(1440))
        end = moment + timedelta(hours=26)
        expected = reference_fires(spec, tz, moment - timedelta(hours=26), end)
        assert [iso(t) for t in until(cron, start, end)] == [iso(t) for t in expected], \
            (spec.expr, iso(start))
