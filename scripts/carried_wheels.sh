# Sourced by the scripts that run on an accelerator machine without a package index: installs
# the wheels carried in .whl/ (if any) into /tmp/dfqf_site with $PYTHON, without dependencies
# (the machine has them), and puts that folder on PYTHONPATH.
if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install --quiet --upgrade --no-index --no-deps --target /tmp/dfqf_site \
    .whl/*.whl
  export PYTHONPATH=/tmp/dfqf_site${PYTHONPATH:+:$PYTHONPATH}
fi
