"""(stub) registry: name -> how to build and where the weights live."""
