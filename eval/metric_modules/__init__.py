"""Local `evaluate` metric modules: load one with evaluate.load(str(path to its folder)), no Hub needed."""
