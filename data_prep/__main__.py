import sys

from tpds_common.errors import report_user_errors

from .cli import PROG, main

sys.exit(report_user_errors(PROG, main))
