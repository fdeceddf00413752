"""Every option of a prune, declared once: `PruneConfig`.

Each field of `PruneConfig` is one option of `prune_model`: its default, type (the
annotation), help text, validator, command-line flag with its argparse specifics, and whether
every rank of a distributed prune must be given it alike (`declare.Option`). The
`fastprune prune` flags, the workflow's `PruneJob`, `prune_model`'s keywords and docstring and
docs/options.md are made from it. Method options (blocksize, percdamp, max_swaps, ...) are
each method's own (`Method.options`); `METHOD_FLAGS` says which of them the command line
offers, and how. Errors name an option as the caller spells it: `name` maps an option to its
Python keyword (`keyword`, the default) or to its flag (`flag_of`). This package imports
neither the pipeline nor the command line.
"""

from .declare import (
    SAME,
    Name,
    Option,
    add_arguments,
    check_declared,
    extend,
    given,
    job_fields,
    keyword,
    option,
    options,
    reuse,
)
from .docs import options_markdown, write_options_doc
from .method_flags import (
    METHOD_FLAG_OF,
    METHOD_FLAGS,
    MethodFlag,
    add_method_flags,
    reconstruct_arg,
)
from .prune_config import (
    ALLOCATIONS,
    LEGACY_ORDER,
    OWL_LAMBDA,
    OWL_THRESHOLD,
    Checked,
    PruneConfig,
    agreed,
    check_config,
    check_method_options,
    flag_of,
    make_config,
)
from .validators import (
    check_device,
    check_method,
    flag_bool,
    integer,
    number_in,
    one_of,
    optional,
    patterns,
    text,
)

__all__ = [
    "ALLOCATIONS",
    "LEGACY_ORDER",
    "METHOD_FLAGS",
    "METHOD_FLAG_OF",
    "OWL_LAMBDA",
    "OWL_THRESHOLD",
    "SAME",
    "Checked",
    "MethodFlag",
    "Name",
    "Option",
    "PruneConfig",
    "add_arguments",
    "add_method_flags",
    "agreed",
    "check_config",
    "check_declared",
    "check_device",
    "check_method",
    "check_method_options",
    "extend",
    "flag_bool",
    "flag_of",
    "given",
    "integer",
    "job_fields",
    "keyword",
    "make_config",
    "number_in",
    "one_of",
    "option",
    "options",
    "optional",
    "options_markdown",
    "patterns",
    "reconstruct_arg",
    "reuse",
    "text",
    "write_options_doc",
]
