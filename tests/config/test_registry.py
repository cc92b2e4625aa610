"""The parameter registry (trimail/config/registry.py) and Config's typed access."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from trimail import config
from trimail.config import Config, UnknownParameter
from trimail.config.param import POSTFIX, TRIMAIL
from trimail.config.registry import PARAMETERS, TABLES
from trimail.config.values import TIME_UNIT, describe, parse_size, python_type

# Postfix 3.7 renamed smtpd_per_record_deadline to smtpd_per_request_deadline; the
# old name is still honoured there, so it stays Postfix's (postconf -d lists only the new).
RENAMED_IN_POSTFIX = {"smtpd_per_record_deadline"}


def test_every_parameter_has_a_doc_an_origin_and_a_known_type():
    for name, param in PARAMETERS.items():
        assert param.doc and not param.doc.startswith("(trimail)"), name
        assert param.origin in (POSTFIX, TRIMAIL), name
        assert describe(param.parse) and python_type(param.parse), name


def test_units_follow_the_parser():
    assert PARAMETERS["smtpd_timeout"].unit == "s"
    assert PARAMETERS["maximal_queue_lifetime"].unit == "d"
    assert PARAMETERS["delay_warning_time"].unit == "h"
    assert PARAMETERS["message_size_limit"].unit == "bytes"
    assert PARAMETERS["smtpd_banner"].unit == ""
    for param in PARAMETERS.values():
        assert bool(param.unit) == (param.parse in TIME_UNIT or param.parse is parse_size), param.name


def test_every_table_entry_is_in_the_registry_once():
    names = [param.name for table in TABLES for param in table.PARAMS]
    assert len(names) == len(set(names)) == len(PARAMETERS)


@pytest.mark.skipif(shutil.which("postconf") is None, reason="Postfix's postconf is not installed")
def test_origin_postfix_means_postfix_has_the_parameter():
    """The origin column is checked against the installed Postfix's own list
    (``postconf -d``): a name it knows is Postfix's, any other is trimail's."""
    listing = subprocess.run(["postconf", "-d"], capture_output=True, text=True, check=True).stdout
    known = {line.partition(" =")[0] for line in listing.splitlines()}
    wrong = [f"{name} ({param.origin})" for name, param in PARAMETERS.items()
             if name not in RENAMED_IN_POSTFIX and (name in known) != (param.origin == POSTFIX)]
    assert wrong == []


def test_no_parameter_is_shadowed_by_a_config_attribute():
    cfg = config.load(None, [])
    own = set(dir(Config)) | set(vars(cfg))
    assert own.isdisjoint(PARAMETERS)


def test_misspelt_parameter_read_as_attribute_names_it_and_the_closest():
    cfg = config.load(None, [])
    with pytest.raises(UnknownParameter, match=r"^unknown parameter smtpd_timout \(did you mean smtpd_timeout\?\)$"):
        cfg.smtpd_timout  # noqa: B018 - the read is the test
    with pytest.raises(AttributeError, match=r"^unknown parameter no_such_thing_at_all$"):
        cfg.no_such_thing_at_all  # noqa: B018
    assert not hasattr(cfg, "smtpd_timout") and getattr(cfg, "smtpd_timout", 7) == 7


def test_misspelt_parameter_read_by_name_is_an_error_but_a_name_main_cf_sets_is_text():
    cfg = config.load(None, ["my_own_list=a, b"])
    with pytest.raises(KeyError, match=r"^unknown parameter message_size_limt \(did you mean message_size_limit\?\)$"):
        cfg["message_size_limt"]
    with pytest.raises(UnknownParameter):
        cfg.get("message_size_limt")
    assert cfg["my_own_list"] == "a, b" and cfg["stress"] == ""


def test_attribute_reads_are_typed_and_the_same_as_get():
    cfg = config.load(None, ["smtpd_timeout=2m", "message_size_limit=1000"])
    assert cfg.smtpd_timeout == 120.0 == cfg.get("smtpd_timeout")
    assert cfg.smtpd_timeout == 120.0  # the second read (kept on the instance)
    assert cfg.message_size_limit == 1000 and isinstance(cfg.message_size_limit, int)
    assert cfg.with_overrides({"smtpd_timeout": "5s"}).smtpd_timeout == 5.0
    assert cfg.smtpd_timeout == 120.0


def test_typed_annotations_match_the_registry():
    annotations = Config.__mro__[1].__annotations__
    assert list(annotations) == list(PARAMETERS)
    assert annotations["smtpd_timeout"] == "float" and annotations["mynetworks"].startswith("list[")
