"""``python -m tests.support.run run --config FILE``: the bot's own command line, with the scripted engine
registered first, so that a real ``llava-bot run`` process can answer with ``model.engine = "scripted"``
(its settings come from ``model.ov_config``; see tests/support/scripted.py)."""

from bot.cli import main
from bot.engine.manager import ENGINES
from tests.support.scripted import ENTRY, NAME

ENGINES[NAME] = ENTRY
raise SystemExit(main())
