"""Plots and the HTML report built from a results folder."""
