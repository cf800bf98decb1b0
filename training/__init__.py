"""Training code for the shipped model family: data, trainers, evaluation, model builders."""
