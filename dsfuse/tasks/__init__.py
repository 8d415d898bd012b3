"""One recipe per task between the models and the commands: options, data, loss, evaluation, prediction.

A command in `dsfuse/cli/` parses its options, calls its task here and prints the result; benches and
the demo call tasks too. See ARCHITECTURE.md.
"""
