"""The application: the main job's recipe (recipe) and the command line (cli). Imports any room."""
