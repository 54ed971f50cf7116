"""The flow objects that `prefect.yaml` deploys: `flows/deployments.py:extract`, `:rank`, `:compare`.

`prefect deploy` and a worker's flow runs load a flow from a `path/to/file.py:object`
entrypoint, so the flows need module-level objects somewhere. They live here and only
here: `flows.extract`, `flows.rank` and `flows.compare` build their flows on demand
(`build_flow()`), so that importing them, or `--help`, never pulls in Prefect.
See docs/deployments.md for the commands.
"""

from __future__ import annotations

from flows import compare as _compare
from flows import extract as _extract
from flows import rank as _rank

extract = _extract.build_flow()
rank = _rank.build_flow()
compare = _compare.build_flow()
