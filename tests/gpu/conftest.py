# GPU check scripts, run by hand on a 2-GPU machine (bash tests/gpu/run.sh); never collected by pytest.
collect_ignore_glob = ["*.py"]
