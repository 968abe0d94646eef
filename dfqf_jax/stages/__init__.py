"""One module per stage; each exposes `run(config, workdir)`."""
