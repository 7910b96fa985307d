"""One module per quantizer (see ``expcuda.quant.spec`` for what each declares)."""
