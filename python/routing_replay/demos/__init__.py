"""Small runnable demonstrations of one package each (the RL job is the project's main program)."""
