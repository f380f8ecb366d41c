"""The defaults of a compression job that the command line and the library share,
importable without torch (the command line builds its help from them)."""

# the budget of a compression job when neither the command line nor its --config gives one:
# 12 % of the model's float32 weight bytes, rank and precision chosen per layer (README)
JOB_BYTES = "0.12x"
