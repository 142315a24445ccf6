//! Redis Functions (Redis 7): a Lua library that registers one function,
//! loaded on a server the first time a call finds it missing there.
//!
//! A script's body runs whole on every `EVALSHA`, so a script with helpers
//! makes them afresh on every call; a library's top level runs once, at
//! load. Used where that cost shows: the rate-limit check, once per Check.
//! The other scripts stay `EVALSHA`.
//!
//! Each library is named after its code (`cachecoord_<file>_<16 hex digits
//! of its SHA1>`) and registers a function of that name: instances of two
//! versions sharing one Redis during a rolling upgrade each call their own
//! code, and a library already loaded is never replaced by other code.

use redis::{Cmd, FromRedisValue, RedisError, RedisResult, ToRedisArgs, aio::ConnectionLike};

/// A function and the library that registers it.
pub struct Function {
    /// The function's name, also its library's.
    name: String,
    /// `FUNCTION LOAD REPLACE <library>`: REPLACE because another instance
    /// may load the same code at the same moment.
    load: Cmd,
}

impl Function {
    /// The function that `lua/<file>` (`code`) registers under the name
    /// `FUNCTION_NAME`, which this sets.
    pub fn new(file: &'static str, code: &str) -> Self {
        let stem = file.trim_end_matches(".lua");
        let hash = redis::Script::new(code).get_hash().to_owned();
        let name = format!("cachecoord_{stem}_{}", &hash[..16]);
        crate::otel::register_script(&name, stem);
        let library = format!("#!lua name={name}\nlocal FUNCTION_NAME = '{name}'\n{code}");
        let mut load = redis::cmd("FUNCTION");
        load.arg("LOAD").arg("REPLACE").arg(library);
        Self { name, load }
    }

    /// A call to gather keys and arguments for.
    pub fn prepare_call(&self) -> FunctionCall<'_> {
        FunctionCall { function: self, keys: Vec::new(), args: Vec::new() }
    }
}

/// One call of a function: its keys and arguments.
pub struct FunctionCall<'a> {
    function: &'a Function,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl FunctionCall<'_> {
    /// Adds a key (`keys` in the function).
    pub fn key(&mut self, key: impl ToRedisArgs) -> &mut Self {
        key.write_redis_args(&mut self.keys);
        self
    }

    /// Adds an argument (`args` in the function).
    pub fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    /// The `FCALL` command.
    pub fn command(&self) -> Cmd {
        let mut call = redis::cmd("FCALL");
        call.arg(&self.function.name).arg(self.keys.len()).arg(&self.keys).arg(&self.args);
        call
    }

    /// Sends `FCALL` on `con`; where the server lacks the function (a first
    /// call, a restart without persistence, a new cluster node), loads the
    /// library and sends it again.
    pub async fn invoke_async<T: FromRedisValue>(&self, con: &mut impl ConnectionLike) -> RedisResult<T> {
        let call = self.command();
        match call.query_async(con).await {
            Err(err) if is_missing(&err) => {
                self.function.load.query_async::<redis::Value>(con).await?;
                call.query_async(con).await
            }
            reply => reply,
        }
    }
}

/// Redis's answer to `FCALL` of a function it does not have.
fn is_missing(err: &RedisError) -> bool {
    err.code() == Some("ERR") && err.detail().is_some_and(|detail| detail.starts_with("Function not found"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_follows_the_code() {
        let a = Function::new("check.lua", "redis.register_function(FUNCTION_NAME, function() return 1 end)");
        let b = Function::new("check.lua", "redis.register_function(FUNCTION_NAME, function() return 2 end)");
        assert!(a.name.starts_with("cachecoord_check_") && a.name.len() == "cachecoord_check_".len() + 16);
        assert_ne!(a.name, b.name);
        let library = a.load.args_iter().nth(3);
        let Some(redis::Arg::Simple(library)) = library else { panic!("no library in {:?}", a.load) };
        let library = String::from_utf8_lossy(library);
        assert!(library.starts_with(&format!("#!lua name={}\nlocal FUNCTION_NAME = '{}'\n", a.name, a.name)));
    }
}
