# Python 2.7 launcher for the Autobahn|Testsuite installed by install.sh.
#
#   python2.7 wstest_launcher.py SPEC.json
#
# Adds tests/autobahn/.deps (or $AUTOBAHN_DEPS) as a site dir, so that the
# zope namespace .pth file is processed, then runs wstest in fuzzingclient mode.
import os
import site
import sys

here = os.path.dirname(os.path.abspath(__file__))
deps = os.environ.get("AUTOBAHN_DEPS") or os.path.join(here, ".deps")

if sys.version_info[:2] != (2, 7):
    sys.stderr.write("wstest_launcher: needs Python 2.7, got %s\n" % sys.version.split()[0])
    sys.exit(2)
if len(sys.argv) != 2:
    sys.stderr.write("usage: %s SPEC.json\n" % sys.argv[0])
    sys.exit(2)
if not os.path.isdir(deps):
    sys.stderr.write("wstest_launcher: %s missing; run tests/autobahn/install.sh\n" % deps)
    sys.exit(2)

site.addsitedir(deps)
spec = os.path.abspath(sys.argv[1])
sys.argv = ["wstest", "-m", "fuzzingclient", "-s", spec]

from autobahntestsuite import wstest  # noqa: E402

wstest.run()
