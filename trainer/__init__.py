"""The trainer: the program inside the pods (validate, train, merge, evaluate). Never imports the operator."""
