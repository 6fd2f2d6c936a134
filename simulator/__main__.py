"""``python -m simulator``: run the upstream simulator."""

from simulator.cli import sim

if __name__ == "__main__":
    sim(prog_name="python -m simulator")
