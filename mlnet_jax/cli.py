"""Running an absl command: user errors become one line and exit status 2.

Tracebacks are for bugs; a bad path, a wrong field or a missing dataset is the user's to fix,
so it is reported as ``error: <message>`` (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from mlnet_jax.errors import UserError
from mlnet_jax.interrupts import sigterm_raises, stopped


PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def resolve_packaged_config(argv: list[str]) -> list[str]:
    """Let ``--config configs/X.py`` name the configs shipped in the package when there is no
    such file here (a pip install without a checkout, e.g. on Colab)."""
    argv = list(argv)
    for index, path in _config_arguments(argv):
        file, sep, rest = path.partition(":")  # config_flags allows 'file.py:argument'
        parts = Path(file).parts
        if not Path(file).exists() and len(parts) == 2 and parts[0] == "configs":
            packaged = PACKAGED_CONFIGS / parts[1]
            if packaged.exists():
                resolved = f"{packaged}{sep}{rest}"
                argv[index] = f"--config={resolved}" if argv[index].startswith("--config=") \
                    else resolved
    return argv


def run_absl(body: Callable[[], int | None], argv: list[str] | None = None,
             config: tuple[str, str] | None = None,
             define: Callable[[], None] | None = None) -> int:
    """Parse absl flags, run ``body()`` and return its exit status (``--debug`` must be defined).

    ``define()`` defines the command's flags, and ``config=(default file, help)`` the
    ``--config`` flag (ml_collections), so a ``--config.key`` naming no field and a config
    file that cannot be loaded are one line too, as is any flag absl cannot parse (absl itself
    exits 1 with two lines). Those flags are forgotten when it returns, and the logging state
    absl changes is put back, so that a notebook can call a command's ``main(argv)`` again.
    """
    from absl import app, flags  # noqa: F401 — app's own flags exist before the snapshot
    from absl import logging as absl_logging

    argv = _last_override_of_each_field(
        resolve_packaged_config(sys.argv if argv is None else argv))
    before, ours = set(flags.FLAGS), None
    with _logging_kept(absl_logging):
        try:
            failed = _define_flags(argv, config, define)
            ours = set(flags.FLAGS) - before  # not those of modules the run imports (grain's)
            return failed if failed is not None else _parse_and_run(body, argv, config)
        finally:  # ml_collections defines a flag per --config.key override while parsing
            new = set(flags.FLAGS) - before
            for name in new if ours is None else ours | {n for n in new if n.startswith("config.")}:
                delattr(flags.FLAGS, name)


def _last_override_of_each_field(argv: list[str]) -> list[str]:
    """Only the last ``--config.key=value`` of each key, as for every other flag: ml_collections
    joined a tuple field's repeats (``input_size=64,96`` then ``=32,32`` gave (64, 96, 32, 32))."""
    end = argv.index("--") if "--" in argv else len(argv)
    keys = [arg.partition("=")[0] if arg.startswith("--config.") and "=" in arg else None
            for arg in argv[:end]]
    return [arg for i, arg in enumerate(argv[:end])
            if keys[i] is None or keys[i] not in keys[i + 1:]] + argv[end:]


@contextlib.contextmanager
def _logging_kept(absl_logging) -> Iterator[None]:
    """The root logger's level and handlers, absl's verbosity and faulthandler as they were:
    ``app.run`` sets them for a process that ends with the command."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), absl_logging.get_verbosity(),
             faulthandler.is_enabled())
    try:
        yield
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        absl_logging.set_verbosity(saved[2])
        if not saved[3]:
            faulthandler.disable()


def _define_flags(argv: list[str], config, define) -> int | None:
    """Define the command's flags; an exit status if the config file cannot be used."""
    from absl import flags

    if define is not None:
        define()
    if config is not None:
        from ml_collections import config_flags
        try:  # it applies the --config.key overrides it finds in argv here
            config_flags.DEFINE_config_file("config", config[0], config[1], lock_config=True,
                                            sys_argv=argv)
        except (KeyError, AttributeError) as e:
            return _no_get_config(argv) if _lacks_get_config(e) else _no_such_field(e)
        except OSError as e:  # an override applied to a file that could not be loaded
            return _cannot_load(argv, e)
        # --help lists the main module's key flags; --config is defined here, not there.
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["config"])
    return None


def _parse_and_run(body, argv: list[str], config) -> int:
    from absl import app, flags

    def parse(args: list[str]) -> list[str]:
        try:
            return flags.FLAGS(args)
        except flags.Error as e:
            print(f"error: {_one_line(e, args)}", file=sys.stderr)
        except (KeyError, AttributeError) as e:  # a --config.key naming no field
            if config is None:
                raise
            _no_get_config(args) if _lacks_get_config(e) else _no_such_field(e)
        except OSError as e:  # a --config.key applied to a file that could not be loaded
            if config is None:
                raise
            _cannot_load(args, e)
        sys.exit(2)

    def run(_):
        try:
            with sigterm_raises():  # train sets its own while it trains
                if config is not None:
                    _load_config(flags.FLAGS)
                return body() or 0
        except UserError as e:
            if flags.FLAGS.debug:
                raise
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            if flags.FLAGS.debug:
                raise
            return stopped(e, "what was written is complete, none of it half-written")

    try:
        app.run(lambda args: sys.exit(run(args)), argv=argv, flags_parser=parse)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    return 0


def _one_line(error: Exception, argv: list[str]) -> str:
    """absl's flag error; for a config file that raised, the last line of the traceback it
    embeds, and a value of the wrong type as the field and the type it needs."""
    text = str(error)
    if "Error whilst parsing config file" not in text:
        return text
    found = _config_arguments(argv)
    last = [line.strip() for line in text.splitlines() if line.strip()][-1]
    wrong = re.search(r"Could not override field '([^']+)' \(reference\)\. (.*) is of original "
                      r"type <class '(\w+)'> and cannot be casted to type <class '(\w+)'>", last)
    if wrong:
        field, value, given, needed = wrong.groups()
        last = f"config.{field} must be {needed}, got {value} ({given})"
    return f"--config {found[-1][1] if found else ''}: {last}"


def _config_arguments(argv: list[str]) -> list[tuple[int, str]]:
    """(index, value) of every ``--config`` value in ``argv``; absl uses the last."""
    found = []
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            found.append((i, arg.split("=", 1)[1]))
        elif arg == "--config" and i + 1 < len(argv):
            found.append((i + 1, argv[i + 1]))
    return found


def _cannot_load(argv: list[str], error: OSError) -> int:
    found = _config_arguments(argv)
    reason = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
    print(f"error: --config {found[-1][1] if found else ''}: cannot load it ({reason})",
          file=sys.stderr)
    return 2


def _lacks_get_config(error: Exception) -> bool:
    return isinstance(error, AttributeError) and "has no attribute 'get_config'" in str(error)


def _no_get_config(argv: list[str]) -> int:
    found = _config_arguments(argv)
    print(f"error: --config {found[-1][1] if found else ''}: defines no get_config() (a config "
          "file's get_config() returns the fields of mlnet_jax/configs/default.py, as "
          "configs/salicon.py does)", file=sys.stderr)
    return 2


def _no_such_field(error: Exception) -> int:
    """ml_collections' KeyError text: the field in quotes, maybe with 'Did you mean "x"'."""
    text = str(error)
    field = re.search(r"'([^'\\]+)", text)
    field = field.group(1) if field else text
    guess = re.search(r'Did you mean "([^"]+)"', text)
    hint = f" (did you mean {guess.group(1)}?)" if guess else ""
    print(f"error: --config.{field}: the config has no field {field!r}{hint}", file=sys.stderr)
    return 2


def _load_config(FLAGS) -> None:
    """Load ``--config`` now (ml_collections defers a failure to the first use of the config)."""
    from ml_collections import config_flags

    from mlnet_jax.configs import default
    name = config_flags.get_config_filename(FLAGS["config"])
    try:
        FLAGS.config.to_dict  # on a failed load, a stand-in that raises on any attribute
    except OSError as e:
        reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        raise UserError(f"--config {name}: cannot load it ({reason})") from None
    missing = [key for key in default.get_config().keys() if key not in FLAGS.config]
    if missing:
        raise UserError(f"--config {name}: has no field {', '.join(missing[:3])}"
                        f"{f' (and {len(missing) - 3} more)' if len(missing) > 3 else ''}; a "
                        "config starts from mlnet_jax.configs.default.get_config(), as "
                        "configs/salicon.py does")
