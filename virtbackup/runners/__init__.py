"""How one planned backup's copy runs: the plan every runner receives, the runner protocol, and the
push, pull and offline runners."""
