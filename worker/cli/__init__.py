"""`fapm`: the command line. Its flags are generated from JobSpec, so the CLI and the API cannot drift.

`fapm prune` runs a job in this process; `fapm submit/status/wait/cancel/jobs/report` are a client
of the service's REST API (`--api-url` or FAPM_API_URL; the key only from FAPM_API_KEY, so it never
lands in shell history or `ps`). The client commands import no torch: engine imports stay inside
`_prune` and `_demo`.

Exit codes: 0 success; 2 usage error (bad flags or values, a device or kernel this machine cannot
run, a missing or refused API key, a request the API rejects as invalid, an unknown job); 1 a
failed or cancelled job (bad input files included), an API that cannot be reached or cannot do it
now (409, 429, 5xx); 3 an unexpected error (a bug: `fapm --debug ...` shows its traceback);
130 interrupted. Each with a one-line message `fapm: error [code]: message`, never a traceback.
"""

from worker.cli.app import build_parser, main, tune_runtime
from worker.cli.spec_flags import add_spec_arguments, spec_from_args

__all__ = ["add_spec_arguments", "build_parser", "main", "spec_from_args", "tune_runtime"]
