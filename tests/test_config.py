"""`fastprune.config`: every pipeline option declared once in `PruneConfig`, and what is
made from it (the command's flags, `PruneJob`, `prune_model`'s keywords, checks and
docstring, docs/options.md)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from pipeline_helpers import calib_ids, tiny_model

import fastprune as fp
from fastprune import config
from fastprune.app import cli, workflow
from fastprune.config import PruneConfig, check_config, extend, number_in, option, options
from fastprune.methods import METHODS
from fastprune.models import find_blocks, find_linears, get_weight
from fastprune.solvers.recipes import RECONSTRUCT

DOCS = Path(__file__).resolve().parent.parent / "docs" / "options.md"


def test_docs_table_is_the_generated_one():
    """docs/options.md is `options_markdown()`'s text: regenerate it when an option changes
    (the command is in its header)."""
    assert DOCS.read_text(encoding="utf-8") == config.options_markdown(
        PruneConfig, workflow.PruneJob
    )


def test_every_option_has_help_a_default_and_its_flag_in_the_parser():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["prune"]
    flags = {s for a in sub._actions for s in a.option_strings}
    for key, opt in options(workflow.PruneJob).items():
        assert opt.text, key
        if opt.flag_name is not None:
            assert opt.flag_name in flags, key
    for f in config.METHOD_FLAGS:
        assert f.flag_name in flags and f.help()
    assert {f.name for f in dataclasses.fields(workflow.PruneJob)} >= {
        k for k, o in options(PruneConfig).items() if o.in_job
    }


def test_agreed_options_are_the_declared_ones():
    assert set(config.agreed(PruneConfig())) == {
        "method", "sparsity", "prune_n", "prune_m", "seed", "batch_size", "hessian_precision",
        "hessian_kind", "moe_calibration", "asymmetric", "targets", "ignore", "allocation",
        "owl_threshold", "owl_lambda", "quant", "bits", "group_size", "sym", "actorder",
    }  # fmt: skip


def test_job_and_prune_model_defaults_come_from_the_config():
    job = workflow.PruneJob()
    for key, opt in options(PruneConfig).items():
        if opt.in_job:
            assert getattr(job, key) == opt.command_default, key
    assert (job.nsamples, job.seqlen, job.device) == (32, 512, "cpu")  # the command's
    assert PruneConfig().nsamples == 128 and PruneConfig().device is None  # prune_model's
    cfg = job.config()
    assert isinstance(cfg, PruneConfig) and cfg.nsamples == 32 and cfg.prune_n == 0
    assert workflow.PruneJob(pattern="2:4").config().prune_m == 4


# a bad value of one option; the same check must refuse it from Python and from the command
BAD = [
    ({"method": "obs"}, ValueError, "method"),
    ({"sparsity": 1.5}, ValueError, "sparsity"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"nsamples": 0}, ValueError, "nsamples"),
    ({"hessian_precision": "tf32"}, ValueError, "hessian_precision"),
    ({"method": "sparsegpt", "hessian_kind": "diagonal"}, ValueError, "hessian_kind"),
    ({"moe_calibration": "sometimes"}, ValueError, "moe_calibration"),
    ({"allocation": "owl2"}, ValueError, "allocation"),
    ({"allocation": "owl", "owl_lambda": 0.7}, ValueError, "owl_lambda"),
    ({"method": "magnitude", "allocation": "owl"}, ValueError, "allocation"),
    ({"targets": 3}, TypeError, "targets"),
    ({"device": "gpu"}, ValueError, "device"),
    ({"method": "sparsegpt", "asymmetric": 1}, TypeError, "asymmetric"),
    ({"method": "sparseswaps", "options": {"max_swaps": -1}}, ValueError, "max_swaps"),
    ({"method": "gblm", "options": {"norm": "l3"}}, ValueError, "norm"),
]


@pytest.mark.parametrize("kw,exc,key", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_one_check_names_the_option_as_the_caller_spells_it(kw, exc, key):
    model = tiny_model("llama")
    options_kw = kw.get("options", {})
    plain = {k: v for k, v in kw.items() if k != "options"}
    with pytest.raises(exc) as py:
        fp.prune_model(model, calib_ids(2, 8), **plain, **options_kw, progress=False)
    assert re.match(rf"{key}\b", str(py.value)), str(py.value)
    assert all((get_weight(m) != 0).all() for m in find_linears(find_blocks(model)[1][0]).values())
    job = workflow.PruneJob(**plain, options=options_kw)
    with pytest.raises(exc) as cmd:
        workflow.check_prune_job(job, cli.flag)
    flag = cli.flag(key)
    assert str(cmd.value).startswith(flag), str(cmd.value)
    # the same message: only the spelling of the option differs
    python_message = str(py.value)
    for value in plain.values():
        python_message = python_message.replace(f"{key}={value!r}", f"{flag} {value}")
    assert str(cmd.value) == re.sub(rf"(?<![-\w]){key}\b", flag, python_message, count=1)


def test_spelling_of_relations():
    sparsegpt = PruneConfig(method="sparsegpt", hessian_kind="diagonal")
    with pytest.raises(ValueError, match=r"^hessian_kind='diagonal' does not fit 'sparsegpt'"):
        check_config(sparsegpt)
    with pytest.raises(ValueError, match=r"^--hessian-kind diagonal does not fit 'sparsegpt'"):
        check_config(sparsegpt, cli.flag)
    both = PruneConfig(method="wanda", asymmetric=True, hessian_kind="diagonal")
    with pytest.raises(ValueError, match="^--asymmetric True needs the full H; --hessian-kind"):
        check_config(both, cli.flag)
    checked = check_config(PruneConfig(method="wanda", allocation="owl", prune_n=2, prune_m=4))
    assert checked.config.allocation == "uniform" and checked.config.hessian_kind == "diagonal"


def test_an_option_added_in_one_place_reaches_the_command_prune_model_and_the_docs():
    """One field added to the configuration (`config.extend`) is a flag, a job field, a
    keyword `prune_model` accepts and checks (naming it as the caller spells it), and a row
    of the docs table."""
    spec = option(1.0, "a test option: how hard to try", check=number_in(0.0, 10.0))
    Extended = extend(PruneConfig, "effort", "float", spec)
    Job = workflow.job_for(Extended)
    # the command
    parser = cli.build_parser(Job)
    args = parser.parse_args(["prune", "--method", "magnitude", "--effort", "2.5"])
    job = cli.prune_job(args, Job)
    assert job.effort == 2.5 and job.config().effort == 2.5
    assert isinstance(job.config(), Extended)
    with pytest.raises(ValueError, match=r"^--effort must be a number in \(0.0, 10.0\)"):
        workflow.check_prune_job(Job(effort=11.0), cli.flag)
    # prune_model's keywords and checks
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"^effort must be a number in \(0.0, 10.0\)"):
        fp.prune_model(model, None, Extended(), method="magnitude", effort=11.0)
    rep = fp.prune_model(model, None, Extended(), method="magnitude", effort=3.0, progress=False)
    assert rep.achieved_sparsity == pytest.approx(0.5)
    with pytest.raises(TypeError, match="does not take effort"):  # not an option of the plain one
        fp.prune_model(tiny_model("llama"), None, method="magnitude", effort=3.0)
    # the docs table
    row = next(r for r in config.options_markdown(Extended).splitlines() if "`effort`" in r)
    assert "`--effort`" in row and "how hard to try" in row and "`1.0`" in row


def test_config_object_and_overrides():
    calib = calib_ids(2, 16)
    cfg = PruneConfig(method="sparsegpt", sparsity=0.4, options={"blocksize": 16})
    a, b = tiny_model("llama"), tiny_model("llama")
    ra = fp.prune_model(a, calib, cfg, progress=False)
    rb = fp.prune_model(b, calib, method="sparsegpt", sparsity=0.4, blocksize=16, progress=False)
    assert ra.options == rb.options and ra.options["blocksize"] == 16
    for x, y in zip(find_linears(find_blocks(a)[1][0]).values(),
                    find_linears(find_blocks(b)[1][0]).values()):  # fmt: skip
        assert torch.equal(get_weight(x), get_weight(y))
    rc = fp.prune_model(tiny_model("llama"), calib, cfg, blocksize=32, progress=False)
    assert rc.options["blocksize"] == 32 and rc.sparsity == 0.4  # overrides win


def test_former_positional_order_warns_and_still_works():
    calib = calib_ids(2, 16)
    a, b = tiny_model("llama"), tiny_model("llama")
    with pytest.warns(DeprecationWarning, match="by position are deprecated"):
        ra = fp.prune_model(a, calib, "wanda", 0.5, 2, 4, "cpu", progress=False)
    rb = fp.prune_model(b, calib, method="wanda", prune_n=2, prune_m=4, progress=False)
    assert ra.pattern == rb.pattern == "2:4" and ra.to_dict()["options"] == rb.to_dict()["options"]
    with pytest.raises(TypeError, match="multiple values for 'sparsity'"):
        fp.prune_model(a, calib, "wanda", 0.5, sparsity=0.3)
    with pytest.raises(TypeError, match="at most 7 positional"):
        fp.prune_model(a, calib, "wanda", 0.5, 2, 4, "cpu", "extra")
    with pytest.raises(TypeError, match="by position"):
        fp.prune_model(a, calib, PruneConfig(), "wanda")


def test_prune_model_docstring_is_made_from_the_config_and_the_registry():
    doc = fp.prune_model.__doc__
    for name in METHODS:
        assert f"{name}:" in doc, name
    for key in options(PruneConfig):
        if key != "options":
            assert f"{key} (default" in doc, key
    for value in RECONSTRUCT:
        if value is not False:
            assert repr(value) in doc, value


def test_cli_literals_are_the_declared_ones():
    from fastprune.validation import BACKENDS

    parser = cli.build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    for sub in ("prune", "demo"):
        backend = next(a for a in subs[sub]._actions if a.dest == "backend")
        assert tuple(backend.choices) == BACKENDS
    names = [r for r in RECONSTRUCT if isinstance(r, str)]
    for value in names:
        assert config.reconstruct_arg(value) == value
    args = parser.parse_args(["prune", "--reconstruct"])
    assert args.reconstruct is True


def test_a_method_that_only_quantizes_refuses_sparsity_before_any_work():
    from fastprune.config import PruneConfig, check_config

    with pytest.raises(ValueError, match="method='gptq' quantizes without pruning: sparsity"):
        check_config(PruneConfig(method="gptq"))
    with pytest.raises(ValueError, match="prune_n must be 0"):
        check_config(PruneConfig(method="gptq", sparsity=0.0, prune_n=2, prune_m=4))
    check_config(PruneConfig(method="gptq", sparsity=0.0))  # its own default grid (w4a16)
