# Sourced by the scripts that run on an accelerator machine without a package index: installs
# the wheels carried in .whl/ (if any) into /tmp/dfqf_site with $PYTHON, without dependencies
# (the machine has them), and puts that folder on PYTHONPATH. Once per machine: a later call
# finds them installed (a pipeline left running between calls imports from that folder).
if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  if [ "$(cat /tmp/dfqf_site/.carried_wheels 2>/dev/null)" != "$(ls .whl/*.whl)" ]; then
    "$PYTHON" -m pip install --quiet --upgrade --no-index --no-deps --target /tmp/dfqf_site \
      .whl/*.whl && ls .whl/*.whl > /tmp/dfqf_site/.carried_wheels
  fi
  export PYTHONPATH=/tmp/dfqf_site${PYTHONPATH:+:$PYTHONPATH}
fi
