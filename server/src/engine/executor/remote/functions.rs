//! The functions remote workers have declared.
//!
//! A declared function stays known when no worker serves it any more: its
//! jobs are accepted and wait for the next worker that serves it. Two
//! workers may serve one function only with the same contract (the same
//! argument schema and retry safety); a worker declaring a different one is
//! refused while another worker serves the function, and replaces the old
//! declaration when none does (a new version of the worker). Declarations
//! live in memory: after a restart a function is known again once a worker
//! declares it (its pending jobs are kept meanwhile).

use std::{
    collections::BTreeMap,
    sync::{Arc, PoisonError, RwLock},
};

use super::DeclaredFunction;
use crate::{
    Error,
    function::{Function, Registry},
};

/// One declared function and how many sessions serve it now.
#[derive(Debug, Clone)]
pub(crate) struct Declared {
    pub(crate) function: Arc<Function>,
    pub(crate) serving: usize,
}

#[derive(Debug, Default)]
pub(crate) struct Declarations {
    functions: RwLock<BTreeMap<Arc<str>, Declared>>,
}

impl Declarations {
    /// Records what a worker declares and counts it as serving them; the
    /// names it serves.
    pub(crate) fn declare(
        &self,
        declared: &[DeclaredFunction],
        registry: &Registry,
    ) -> Result<Vec<Arc<str>>, Error> {
        let mut compiled = Vec::with_capacity(declared.len());
        for d in declared {
            if registry.get(&d.name).is_some() {
                return Err(Error::FunctionConflict {
                    function: d.name.clone(),
                    reason: "jobd has a function of that name itself".into(),
                });
            }
            let function = Function::declared(
                &d.name,
                &d.description,
                d.args_schema.clone(),
                d.returns.clone(),
                d.retry_safe,
            )
            .map_err(|err| Error::invalid("attach.functions.args_schema", err.to_string()))?;
            compiled.push(function);
        }
        let mut functions = self.write();
        for function in &compiled {
            if let Some(known) = functions.get(function.name())
                && known.serving > 0
                && !known.function.same_contract(function)
            {
                return Err(Error::FunctionConflict {
                    function: function.name().to_string(),
                    reason: "another worker serves it now with a different argument schema or retry safety".into(),
                });
            }
        }
        let mut names = Vec::with_capacity(compiled.len());
        for function in compiled {
            let name = Arc::clone(function.name());
            let serving = functions.get(&name).map_or(0, |known| known.serving);
            functions.insert(
                Arc::clone(&name),
                Declared {
                    function: Arc::new(function),
                    serving: serving + 1,
                },
            );
            names.push(name);
        }
        Ok(names)
    }

    /// A session serving `names` is gone.
    pub(crate) fn release(&self, names: &[Arc<str>]) {
        let mut functions = self.write();
        for name in names {
            if let Some(known) = functions.get_mut(name) {
                known.serving = known.serving.saturating_sub(1);
            }
        }
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<Function>> {
        self.read().get(name).map(|d| Arc::clone(&d.function))
    }

    #[cfg(test)]
    pub(crate) fn serving(&self, name: &str) -> usize {
        self.read().get(name).map_or(0, |d| d.serving)
    }

    /// Every declared function, sorted by name.
    pub(crate) fn all(&self) -> Vec<Declared> {
        self.read().values().cloned().collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<Arc<str>, Declared>> {
        // Every write is one insert or count update.
        self.functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<Arc<str>, Declared>> {
        self.functions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn declared(name: &str, schema: Option<serde_json::Value>) -> DeclaredFunction {
        DeclaredFunction {
            name: name.into(),
            description: String::new(),
            args_schema: schema,
            returns: None,
            retry_safe: true,
        }
    }

    #[test]
    fn a_different_contract_is_refused_while_served_and_replaces_when_not() {
        let registry = jobd_registry();
        let declarations = Declarations::default();
        let v1 = declared("resize", Some(json!({"type": "string"})));
        let v2 = declared("resize", Some(json!({"type": "object"})));
        declarations
            .declare(std::slice::from_ref(&v1), &registry)
            .unwrap();
        // The same contract: a second worker serves it too.
        declarations
            .declare(std::slice::from_ref(&v1), &registry)
            .unwrap();
        assert_eq!(declarations.serving("resize"), 2);
        assert!(matches!(
            declarations.declare(std::slice::from_ref(&v2), &registry),
            Err(Error::FunctionConflict { .. })
        ));
        let names = [Arc::from("resize")];
        declarations.release(&names);
        declarations.release(&names);
        // Known, served by none: a new contract replaces it.
        assert!(declarations.get("resize").is_some());
        declarations
            .declare(std::slice::from_ref(&v2), &registry)
            .unwrap();
        let schema = declarations.get("resize").unwrap().args_schema().cloned();
        assert_eq!(schema, Some(json!({"type": "object"})));
    }

    #[test]
    fn jobd_s_own_names_and_bad_schemas_are_refused() {
        let registry = jobd_registry();
        let declarations = Declarations::default();
        assert!(matches!(
            declarations.declare(&[declared("hello", None)], &registry),
            Err(Error::FunctionConflict { .. })
        ));
        assert!(matches!(
            declarations.declare(&[declared("x", Some(json!({"type": 5})))], &registry),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(
            declarations.get("x").is_none(),
            "nothing of a refused attach is kept"
        );
    }

    fn jobd_registry() -> Registry {
        crate::builtins::registry()
    }
}
