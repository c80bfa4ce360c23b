"""The experiment's stages in the order they run: teachers, calibration, amalgamation,
selection, the report's rows, tables and figures."""
